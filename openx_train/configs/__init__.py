"""ml_collections ``get_config()`` files of the trainers (``tools/train_bc.py --config=...``)."""
