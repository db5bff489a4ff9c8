"""Multilingual LLaVA-Bench (In-the-Wild) evaluation: answer, judge, summarise, report.

One module per step, each runnable as ``python -m palo.eval.<module>`` with the original PALO/LLaVA flags:

* :mod:`palo.eval.model_vqa`: the model answers the bench questions (batched, resumable).
* :mod:`palo.eval.eval_gpt_review_bench`: an OpenAI-compatible judge scores reference vs model answers.
* :mod:`palo.eval.summarize_gpt_review`: relative scores per category, failed judgments counted, never averaged.
* :mod:`palo.eval.report`: one table (markdown, CSV, JSON) and a bar chart across the 10 languages.
* :mod:`palo.eval.run_bench`: all of the above in one process (model loaded once), behind
  ``scripts/eval/eval_all_languages.sh`` and ``scripts/eval/llavabench.sh``.

Shared pieces: :mod:`palo.eval.jsonl` (line-numbered reading, crash-safe appending), :mod:`palo.eval.bench`
(the two on-disk bench layouts), :mod:`palo.eval.judge` (rubric, prompt, score parser, retrying cached client).
"""
