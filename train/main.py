"""Command line for training: flags only; the work is `train.train_and_evaluate`.

  python -m train --config train/configs/default.py --workdir /tmp/mnist_noisy \
      --config.alpha=0.1 --config.loss=softmax --config.seed=3

Multi-host (e.g. a TPU pod): pass --distributed (or set NOISY_SOFTMAX_DISTRIBUTED=1) on every
host; `jax.distributed.initialize()` then runs before anything touches a device, detecting the
cluster (TPU VMs, SLURM, Open MPI). Elsewhere pass --coordinator_address, --num_processes and
--process_id (which imply --distributed); `python -m train.launch_local` does so for N local
processes. See docs/multihost.md.
"""

import faulthandler
import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Directory for metrics, results and checkpoints.")
flags.DEFINE_bool(
    "distributed",
    os.environ.get("NOISY_SOFTMAX_DISTRIBUTED", "") == "1",
    "Call jax.distributed.initialize() first (multi-host runs).",
)
flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0's coordination service (multi-host; default: auto-detected).")
flags.DEFINE_integer("num_processes", None, "Number of processes (default: auto-detected).")
flags.DEFINE_integer("process_id", None, "This process's index (default: auto-detected).")
flags.DEFINE_integer(
    "initialization_timeout", 60, "Seconds to wait for every process to join (multi-host).")
flags.DEFINE_integer(
    "heartbeat_timeout", 30,
    "Seconds without a heartbeat after which a process counts as dead and the others stop.")
flags.DEFINE_integer(
    "shutdown_timeout", 30, "Seconds a finishing process waits for the others at exit.")
config_flags.DEFINE_config_file(
    "config", None, "Training configuration file (a get_config() module).", lock_config=True
)
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
    """absl's flag parsing, with a bad flag or config override reported in one line, not a trace."""
    try:
        remaining = FLAGS(argv)
        FLAGS.config.keys()  # the config file loads lazily; a missing or broken one fails here
        return remaining
    except (AttributeError, KeyError) as error:
        # ml_collections raises these for an override of a key the config does not have.
        detail = str(error.args[0] if error.args else error)
        detail = detail.strip("'\"").replace("\\'", "'").replace("\\n", " ")
        sys.exit(
            f"error: unknown config key in a --config override: {detail}\n"
            "The keys a config accepts are those of train/configs/default.py."
        )
    except (flags.Error, OSError) as error:
        sys.exit(f"error: {error}\nPass --helpfull for the flags.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        # Orbax logs every checkpoint step at INFO; the progress bar and eval lines suffice.
        logging.set_verbosity(logging.WARNING)
    import jax  # pylint: disable=g-import-not-at-top

    # pylint: disable=g-import-not-at-top  # errors and multihost do not touch a device
    from train import errors, multihost

    explicit = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    if FLAGS.distributed or any(value is not None for value in explicit):
        # A lost peer ends the others with one line (multihost.exit_on_lost_peer); where JAX
        # still aborts, absl's faulthandler would follow with every thread's stack.
        faulthandler.disable()
        multihost.initialize(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
            initialization_timeout_s=FLAGS.initialization_timeout,
            heartbeat_timeout_s=FLAGS.heartbeat_timeout,
            shutdown_timeout_s=FLAGS.shutdown_timeout,
        )
    logging.info(
        "JAX process %d/%d, devices: %s", jax.process_index(), jax.process_count(), jax.devices()
    )
    # pylint: disable=g-import-not-at-top  # after jax.distributed.initialize
    from train import files, train

    files.quiet_disk_full_tracebacks()
    try:
        multihost.check_same_run(FLAGS.config)
        results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except errors.RunError as error:
        print(f"{error.prefix}: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    except Exception as error:  # a bug or an unexpected failure: keeps its traceback
        if jax.process_count() > 1:  # the one line that names the process among N logs
            peer = multihost.lost_peer(error)
            if peer is not None:
                multihost.exit_on_lost_peer(peer)
            print(f"error: process {jax.process_index()} failed: {type(error).__name__}: "
                  f"{error}", file=sys.stderr, flush=True)
        raise
    if jax.process_index() > 0:  # so that every process's agreement can be checked
        print(f"process {jax.process_index()}: params_sha256 {results['params_sha256']}")
    else:
        print(json.dumps(results, indent=2))
        print(
            f"test error {100 * results['test_error']:.2f}% "
            f"(accuracy {100 * results['test_accuracy']:.2f}%); results in "
            f"{os.path.join(os.path.abspath(FLAGS.workdir), 'results.json')}"
        )


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
