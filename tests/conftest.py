"""Shared fixtures: a digits CNN trained once per session, its data files, and a key pair."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent


import models  # noqa: E402  (tests/ is on sys.path under pytest)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """digits.keras (trained), train.npz and eval.npz (with y), calib.npz, labels.txt and keys/ in one folder."""
    from edgeml.core.signing import generate_keys

    out = tmp_path_factory.mktemp("digits")
    model, splits = models.train_digits_cnn(epochs=10, seed=0)
    model.save(out / "digits.keras")
    name = models.INPUT_NAME
    np.savez(out / "train.npz", **{name: splits["train"][0], "y": splits["train"][1]})
    np.savez(out / "calib.npz", **{name: splits["calibration"][0]})
    np.savez(out / "eval.npz", **{name: splits["eval"][0], "y": splits["eval"][1]})
    (out / "labels.txt").write_text("".join(f"{d}\n" for d in range(10)))
    generate_keys(out / "keys")
    return out


@pytest.fixture(scope="session")
def digits_int8_artifact(digits_dir, tmp_path_factory):
    """The digits CNN as a signed int8 .tflite artifact named "digits", built once for the
    device-side tests (they only read it)."""
    import edgeml

    out = tmp_path_factory.mktemp("artifact") / "digits.edgeml"
    edgeml.optimize(edgeml.OptimizeConfig(
        model=digits_dir / "digits.keras", output=out, key=digits_dir / "keys" / "signing.key",
        calibration=str(digits_dir / "calib.npz"), eval=str(digits_dir / "eval.npz"), recipe="int8",
        name="digits", latency_runs=5, plot=False))
    return out


@pytest.fixture()
def mosquitto(tmp_path):
    """A running Mosquitto on a free port (anonymous); stopped after the test. Tests that need
    users, ACLs or TLS build their own ``broker.Mosquitto`` the same way."""
    from broker import Mosquitto

    server = Mosquitto(tmp_path / "mosquitto").start()
    yield server
    server.stop()


PG_BASE = os.environ.get("EDGEML_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture()
def pg_url():
    """A throwaway schema in PostgreSQL's ``test`` database, dropped afterwards."""
    psycopg = pytest.importorskip("psycopg")
    schema = f"edgeml_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG_BASE, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL at {PG_BASE} is not reachable: {exc}")
    admin.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{PG_BASE}?options=-csearch_path%3D{schema}"
    finally:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")
        admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A fresh database: a SQLite file, or a throwaway schema in PostgreSQL's ``test`` database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fleet.db'}"
        return
    yield request.getfixturevalue("pg_url")
