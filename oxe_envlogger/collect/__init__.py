"""The collection hot path (private): the episode recorder, the background writer, the image
encoder pool and its worker processes, and the process lifecycle hooks. The fronts
(:mod:`oxe_envlogger.envlogger`, :mod:`oxe_envlogger.rlds_logger`, ...) are the public way in.
"""
