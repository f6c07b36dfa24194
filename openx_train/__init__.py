"""openx_train: train policies on RLDS datasets logged by ``oxe_envlogger``.

``openx_train.data`` is the input pipeline (TensorFlow ``tf.data``, numpy batches for JAX).
Importing this package imports nothing heavy; import the subpackages you need.
"""
