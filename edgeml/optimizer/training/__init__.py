"""Training stages for Keras 3 models: ``pruning``, ``distill``, and what they share (``keras_train``)."""
