"""PALO for lmms-eval, the evaluation harness of the field (GQA, VQAv2, MME, MMBench, SEED, ... by task name).

Two models, registered with lmms-eval through its entry-point group ``lmms_eval.models`` (``pyproject.toml``), so
``--model palo`` / ``--model palo_api`` work once this package is installed next to lmms-eval:

* ``palo`` (:class:`palo.eval.lmms.model.PaloLMM`): the checkpoint in this process, answers batched through the
  same :class:`palo.eval.model_vqa.Answerer` as ``model_vqa`` (the continuous-batching engine, ``vicuna_v1``
  prompt, padded square images), so an lmms-eval answer is the answer ``model_vqa`` gives to the same question;
* ``palo_api`` (:class:`palo.eval.lmms.api.PaloAPI`): a running PALO server through its OpenAI-compatible API
  (``palo-controller`` + ``palo-worker``), requests sent concurrently.

Both answer ``generate_until`` and log-likelihood requests (``multiple_choice`` tasks): ``palo`` scores with
:mod:`palo.eval.lmms.scoring` or the engine, ``palo_api`` through the server's prompt log-probabilities. Nothing
here imports lmms-eval until lmms-eval loads the entry point.
"""

from __future__ import annotations


def manifests() -> list:
    """The entry point's payload: one ``ModelManifest`` per model (called by lmms-eval's registry)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [
        ModelManifest(model_id="palo", simple_class_path="palo.eval.lmms.model.PaloLMM"),
        ModelManifest(model_id="palo_api", simple_class_path="palo.eval.lmms.api.PaloAPI"),
    ]
