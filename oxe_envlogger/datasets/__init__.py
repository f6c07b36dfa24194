"""Operations on finished datasets: recovery after a crash and salvage of damaged shards,
validation, inspection, visualization, resharding (also as a Beam pipeline) and the tfds summary.

They read and write through :mod:`oxe_envlogger.format`; TensorFlow, Beam and the plotting
libraries are imported only inside the functions that need them.
"""
