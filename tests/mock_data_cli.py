"""`python -m train` with TFDS's mock data: the real CLI, for subprocess tests without a dataset.

    python -m tests.mock_data_cli --config train/configs/default.py --workdir DIR ...

`tfds.testing.mock_data` makes the same arrays in every process, so two runs (or a killed run
and its resumption) see the same data.

MOCK_DATA_FAIL=I:S makes process I raise FileNotFoundError when it reads the batch of step S
(a multi-process test's stand-in for a host whose data went missing).
"""

import os

import tensorflow_datasets as tfds

if __name__ == "__main__":
    from absl import app

    from train import input_pipeline, main

    if os.environ.get("MOCK_DATA_FAIL"):
        import jax

        fail_process, fail_step = map(int, os.environ["MOCK_DATA_FAIL"].split(":"))
        read_batch = input_pipeline.TrainBatches.__call__

        def failing_read(self, step):
            if step == fail_step and jax.process_index() == fail_process:
                raise FileNotFoundError(f"mock data of process {fail_process} is missing")
            return read_batch(self, step)

        input_pipeline.TrainBatches.__call__ = failing_read

    with tfds.testing.mock_data(num_examples=int(os.environ.get("MOCK_DATA_EXAMPLES", "64"))):
        app.run(main.main, flags_parser=main.parse_flags)
