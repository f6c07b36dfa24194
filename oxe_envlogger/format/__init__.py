"""The dataset format on disk: features and value checks, image codecs, TFRecord framing and the
``tf.train.Example`` wire format, the directory layout, the reader and the statistics.

Imports neither gymnasium nor TensorFlow, so a reader (or the trainer) pays for neither. Each module
imports only this package's lower modules and :mod:`oxe_envlogger.errors`.
"""
