"""Run ``palo/train/train_mem.py`` with test probes (used by tests/train/test_train.py, never by users).

``python tests/train/instrumented_train.py palo/train/train_mem.py [flags]`` runs the real entry point unchanged,
with two probes switched on by environment variables:

* ``PALO_TEST_STEP_LOG=<file>``: every optimizer step this process runs appends the global step it starts from,
  so a test can see which steps a (resumed) process really ran, not only what its logs say.
* ``PALO_TEST_STALL_AT_SAVE=<N>`` and ``PALO_TEST_STALL_MARKER=<file>``: the save of ``checkpoint-N`` stops
  half-way (the model and optimizer written, the RNG and trainer state not yet) and the process writes the folder
  it was writing into the marker file and sleeps, so a test can kill it during a save deterministically.
* ``PALO_TEST_BATCH_KINDS=<file>``: every optimizer step appends ``<global step> <rank> image|text``: whether this
  rank's batch held images, so a test can see that ranks whose batches differ in kind trained together.
* ``PALO_TEST_DUMP_ARGV=<file>``: write the entry point's arguments (JSON) and exit without training, so a test
  can rerun exactly what a launch script passes, in one process.
* ``PALO_TEST_INTERPRETED_LIGER=1`` (with ``TRITON_INTERPRET=1``): ``--use_liger_kernel`` runs Liger's real RoPE and
  fused linear cross-entropy kernels on the CPU through Triton's interpreter. Its RMSNorm and SwiGLU kernels cannot
  run interpreted, so those modules stay PyTorch's, and the CUDA check is skipped.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time

import transformers

_training_step = transformers.Trainer.training_step
_save_rng_state = transformers.Trainer._save_rng_state


def _logged_training_step(self, *args, **kwargs):
    with open(os.environ["PALO_TEST_STEP_LOG"], "a") as f:
        f.write(f"{self.state.global_step}\n")
    return _training_step(self, *args, **kwargs)


def _stalling_save_rng_state(self, output_dir, *args, **kwargs):
    if self.state.global_step == int(os.environ["PALO_TEST_STALL_AT_SAVE"]):
        marker = os.environ["PALO_TEST_STALL_MARKER"]
        with open(marker + ".tmp", "w") as f:
            f.write(output_dir)
        os.replace(marker + ".tmp", marker)
        time.sleep(3600)
    return _save_rng_state(self, output_dir, *args, **kwargs)


if os.environ.get("PALO_TEST_INTERPRETED_LIGER"):
    import palo.model.kernels as kernels
    from palo.testing.triton_interpreter import interpretable_liger

    interpretable_liger()
    kernels.liger_available = lambda: (True, "")
if os.environ.get("PALO_TEST_STEP_LOG"):
    transformers.Trainer.training_step = _logged_training_step
if os.environ.get("PALO_TEST_BATCH_KINDS"):
    _unlogged_step = transformers.Trainer.training_step

    def _kind_logging_training_step(self, model, inputs, *args, **kwargs):
        kind = "image" if inputs.get("images") is not None else "text"
        with open(os.environ["PALO_TEST_BATCH_KINDS"], "a") as f:
            f.write(f"{self.state.global_step} {os.environ.get('RANK', '0')} {kind}\n")
        return _unlogged_step(self, model, inputs, *args, **kwargs)

    transformers.Trainer.training_step = _kind_logging_training_step
if os.environ.get("PALO_TEST_STALL_AT_SAVE"):
    transformers.Trainer._save_rng_state = _stalling_save_rng_state

if __name__ == "__main__":
    sys.argv = sys.argv[1:]
    if os.environ.get("PALO_TEST_DUMP_ARGV"):
        with open(os.environ["PALO_TEST_DUMP_ARGV"], "w") as f:
            json.dump(sys.argv[1:], f)
        sys.exit(0)
    runpy.run_path(sys.argv[0], run_name="__main__")
