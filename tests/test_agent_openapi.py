"""The agent's OpenAPI document, served by the agent, holds for the agent: schemathesis generates
requests for every operation against a real ``edgeml-agent run`` (bearer tokens and HTTPS on,
feedback on) and every response must be documented (status, content type, headers, body
schema), none a 5xx. Plus the refusals a fuzzer holding the token never sees: no token, a wrong
one, a certificate the client does not trust; and requests found by hand that gave a 5xx
(nesting beyond the recursion limit, labels beyond 64 bits).
"""
from __future__ import annotations

import collections
import datetime
import http.client
import ipaddress
import json
import math
import ssl

import pytest
import requests
import schemathesis
from agent_proc import AgentProcess
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from device_agent.api.openapi import document
from device_agent.serving import ModelService

TOKEN = "test-token-0123456789abcdef"
EXAMPLES_PER_OPERATION = 100  # generated cases per operation: the whole run takes about 10 s on 2 cores
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_headers_conformance", "response_schema_conformance")


def self_signed(folder, cn: str = "127.0.0.1"):
    """A self-signed certificate for ``cn`` (and the IP SAN 127.0.0.1) and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "api.crt", folder / "api.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def agent(digits_int8_artifact, digits_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("openapi-agent")
    cert, key = self_signed(folder / "tls")
    tokens = folder / "tokens"
    tokens.write_text(f"# the test's token\n{TOKEN}\n")
    proc = AgentProcess(digits_int8_artifact, digits_dir / "keys" / "signing.pub", folder / "data", device="oa1",
                        fleet=None, token=TOKEN, tls_context=ssl.create_default_context(cafile=str(cert)),
                        extra=["--api-token-file", str(tokens), "--tls-cert-file", str(cert), "--tls-key-file",
                               str(key), "--feedback", "on", "--drift", "off"])
    proc.ca, proc.url = cert, f"https://127.0.0.1:{proc.port}"
    proc.start()
    yield proc
    assert proc.terminate() == 0, proc.log()[-2000:]


@pytest.fixture(scope="module")
def session(agent):
    s = requests.Session()
    s.trust_env = False  # else REQUESTS_CA_BUNDLE, if set, overrides s.verify
    s.verify = str(agent.ca)
    s.headers["Authorization"] = f"Bearer {TOKEN}"
    yield s
    s.close()


@pytest.fixture(scope="module")
def api_schema(agent, session):
    """The document the agent serves (loaded as a dict: loaded from its URL, schemathesis would
    leave out the operation that served it)."""
    response = session.get(f"{agent.url}/v2/openapi.json", timeout=10)
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/json"
    schema = schemathesis.openapi.from_dict(response.json())
    schema.config.update(base_url=agent.url, tls_verify=str(agent.ca), request_timeout=10)
    return schema


def infer_one(agent, session, **extra) -> dict:
    body = {"inputs": [{"name": "image", "shape": [1, 8, 8, 1], "datatype": "FP32", "data": [0.5] * 64}], **extra}
    response = session.post(f"{agent.url}/v2/models/digits/infer", json=body, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def fitted(case, model: dict):
    """``case`` with each known input's shape made the model's (a free dim: 1) and its data cycled to
    fill it: the generated values, in a request the agent takes as far as the model."""
    inputs = case.body.get("inputs") if isinstance(case.body, dict) else None
    for item in inputs if isinstance(inputs, list) else []:
        shape = model.get(item.get("name")) if isinstance(item, dict) else None
        if shape is not None and isinstance(item.get("data"), list) and item["data"]:
            item["shape"] = [1 if d == -1 else d for d in shape]
            n = math.prod(item["shape"])
            item["data"] = (item["data"] * n)[:n]
    return case


def labelled(case, ids: list):
    """``case`` naming a request that waits for its label (kept by an earlier inference)."""
    if isinstance(case.body, dict) and ids:
        case.body["id"] = ids.pop()
    return case


def test_every_response_is_as_documented(api_schema, session, agent):
    """Every operation: its documented examples, then schema-valid and schema-violating requests
    (for infer, also schema-valid ones fitted to the model's shapes; for feedback, also ones naming
    requests that wait for a label).

    Driven through Hypothesis directly: schemathesis' pytest integration (``from_fixture``) reads
    ``Function._nodeid``, which pytest 9 no longer has."""
    checks = [getattr(schemathesis.checks, name) for name in CHECKS]
    meta = session.get(f"{agent.url}/v2/models/digits", timeout=10).json()
    model = {t["name"]: t["shape"] for t in meta["inputs"]}
    failures, statuses = [], collections.Counter()
    operations = [result.ok() for result in api_schema.get_all_operations()]
    for operation in operations:
        positive = operation.as_strategy(schemathesis.GenerationMode.POSITIVE)
        generated = [positive, operation.as_strategy(schemathesis.GenerationMode.NEGATIVE)]
        if operation.path.endswith("/infer"):
            generated.append(positive.map(lambda case: fitted(case, model)))
        if operation.path.endswith("/feedback"):
            ids = [infer_one(agent, session)["id"] for _ in range(EXAMPLES_PER_OPERATION)]
            generated += [strategy.map(lambda case: labelled(case, ids)) for strategy in generated]
        examples = operation.get_strategies_from_examples()
        for strategy, count in ((st.one_of(*examples), 2 * len(examples)),
                                (st.one_of(*generated), EXAMPLES_PER_OPERATION)):
            if not count:
                continue

            @settings(max_examples=count, deadline=None, derandomize=True, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def run(case):
                response = case.call_and_validate(session=session, checks=checks, verify=session.verify)
                statuses[operation.label, response.status_code] += 1

            try:
                run()
            except Exception as exc:  # every operation's failures, not only the first one's
                failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)
    assert len(operations) == 12
    # the fuzzer got past the refusals: inferences served, through both infer operations
    assert all(statuses[f"POST {path}", 200] >= 5 for path in
               ("/v2/models/{model_name}/infer", "/v2/models/{model_name}/versions/{model_version}/infer")), statuses
    assert statuses["POST /v2/models/{model_name}/feedback", 200] >= 3, statuses
    assert agent.process.poll() is None
    assert "Traceback" not in agent.log()


def test_the_served_document_is_the_served_models(agent, session, digits_int8_artifact, digits_dir):
    response = session.get(f"{agent.url}/v2/openapi.json", timeout=10)
    doc = response.json()
    # what the route serves is document() of the model: here loaded in-process from the same artifact
    local = document(ModelService.load(digits_int8_artifact, digits_dir / "keys" / "signing.pub"))
    assert doc == json.loads(json.dumps(local))
    assert doc["openapi"] == "3.0.3" and len(doc["paths"]) == 12
    schemathesis.openapi.from_dict(doc).validate()  # against the OpenAPI 3.0 meta-schema
    params = doc["paths"]["/v2/models/{model_name}/versions/{model_version}/infer"]["post"]["parameters"]
    assert [p["schema"]["enum"] for p in params] == [["digits"], ["1"]]
    branches = doc["components"]["schemas"]["InferRequest"]["properties"]["inputs"]["items"]["oneOf"]
    assert {b["properties"]["name"]["enum"][0] for b in branches} == {"image"}
    assert sorted(b["properties"]["datatype"]["enum"][0] for b in branches) == [
        "BOOL", "FP16", "FP32", "INT16", "INT8", "UINT16", "UINT8"]  # what casts to float32 without loss
    assert all(b["properties"]["shape"]["minItems"] == b["properties"]["shape"]["maxItems"] == 4 for b in branches)
    # the documented examples are requests the agent serves, as JSON and as binary outputs
    for name, kind in (("one", "application/json"), ("batch", "application/octet-stream")):
        example = doc["components"]["examples"][name]["value"]
        served = session.post(f"{agent.url}/v2/models/digits/infer", json=example, timeout=10)
        assert served.status_code == 200 and served.headers["Content-Type"] == kind, served.text
    # health is open to anyone in the document; everything else needs the bearer token
    assert doc["paths"]["/v2/health/live"]["get"]["security"] == [{}, {"bearer": []}]
    assert doc["security"] == [{"bearer": []}] and "security" not in doc["paths"]["/v2"]["get"]
    scheme = doc["components"]["securitySchemes"]["bearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    unauthorized = doc["components"]["responses"]["Unauthorized"]
    assert "WWW-Authenticate" in unauthorized["headers"]
    for path, operations in doc["paths"].items():
        for operation in operations.values():
            assert {"401", "503"} <= set(operation["responses"]), path


@pytest.mark.parametrize("authorization", [None, "Bearer not-the-token-0123456789", f"Basic {TOKEN}", "Bearer"])
def test_without_a_valid_token_401_with_www_authenticate(agent, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path in (("GET", "/v2/openapi.json"), ("GET", "/v2/models/digits"), ("GET", "/metrics"),
                         ("POST", "/v2/models/digits/infer"), ("GET", "/v2/health/ready")):
        response = requests.request(method, f"{agent.url}{path}", headers=headers, verify=str(agent.ca),
                                    json={"inputs": []} if method == "POST" else None, timeout=10)
        assert response.status_code == 401, (method, path, response.text)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert isinstance(response.json()["error"], str)


def test_a_client_that_does_not_trust_the_certificate_fails_the_handshake(agent, tmp_path):
    other, _ = self_signed(tmp_path / "other")
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{agent.url}/v2/health/live", verify=str(other), timeout=10)
    conn = http.client.HTTPSConnection("127.0.0.1", agent.port, context=ssl.create_default_context(cafile=str(other)),
                                       timeout=10)
    with pytest.raises(ssl.SSLCertVerificationError):
        conn.request("GET", "/v2/health/live")
    conn.close()
    # plain HTTP on the HTTPS port gets no API answer
    plain = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    try:
        plain.request("GET", "/v2/health/live")
        status = plain.getresponse().status
    except (ConnectionError, http.client.HTTPException, OSError):
        status = None
    finally:
        plain.close()
    assert status != 200
    assert agent.get("/v2/health/live")[0] == 200  # and the agent took all of that in its stride


@pytest.mark.parametrize("path, body", [
    ("/v2/models/digits/infer", b"[" * 100_000 + b"]" * 100_000),
    ("/v2/models/digits/feedback", b"[" * 100_000 + b"]" * 100_000),
    ("/v2/models/digits/infer", b'{"inputs": [{"name": "image", "shape": [1], "datatype": "FP32", "data": '
                                + b"[" * 5000 + b"1" + b"]" * 5000 + b"}]}"),
], ids=["infer-json", "feedback-json", "infer-data"])
def test_deeply_nested_json_is_a_bad_request(agent, session, path, body):
    """Nesting beyond the JSON parser's (or numpy's) recursion limit: 400, not a 500."""
    response = session.post(f"{agent.url}{path}", data=body, headers={"Content-Type": "application/json"},
                            timeout=10)
    assert response.status_code == 400, response.text


@pytest.mark.parametrize("label", [2 ** 64, -(2 ** 63) - 1, [2 ** 70]])
def test_a_label_beyond_64_bits_is_a_bad_request(agent, session, label):
    request_id = infer_one(agent, session)["id"]
    response = session.post(f"{agent.url}/v2/models/digits/feedback", json={"id": request_id, "label": label},
                            timeout=10)
    assert response.status_code == 400, response.text
