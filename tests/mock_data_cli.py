"""`python -m train` with TFDS's mock data: the real CLI, for subprocess tests without a dataset.

    python -m tests.mock_data_cli --config train/configs/default.py --workdir DIR ...

`tfds.testing.mock_data` makes the same arrays in every process, so two runs (or a killed run
and its resumption) see the same data.
"""

import os

import tensorflow_datasets as tfds

if __name__ == "__main__":
    from absl import app

    from train import main

    with tfds.testing.mock_data(num_examples=int(os.environ.get("MOCK_DATA_EXAMPLES", "64"))):
        app.run(main.main, flags_parser=main.parse_flags)
