"""Serve the quickstart model: controller, model worker and Gradio web UI as subprocesses on 127.0.0.1.

:func:`start` starts them with :func:`palo.serve.launch.start_services` (the README's commands, free ports) and
waits until the worker has registered its model and the web UI answers; :func:`serve_forever` prints the URL and
keeps them running until Ctrl-C, then stops them.
"""

from __future__ import annotations

import json
import os
import sys
import time

from palo.serve.launch import Services, port_free, start_services

__all__ = ["Services", "ask_served", "check_served", "serve_forever", "start"]


def start(checkpoint: str, logs: str, web_port: int = 0, timeout: float = 180.0) -> Services:
    """Start controller, worker (CPU) and web UI; return once the model is listed and the UI answers.

    Raises:
        RuntimeError: If a service exits early; TimeoutError if one is not ready in ``timeout`` seconds.
    """
    return start_services(checkpoint, logs, worker_args=["--device", "cpu"], web=True, web_port=web_port,
                          timeout=timeout)


def serve_forever(checkpoint: str, logs: str, web_port: int = 7860) -> int:
    """Start the services, print the URL, wait for Ctrl-C, stop them."""
    from palo.quickstart.pipeline import banner

    banner("Serving the trained model (controller, worker, web UI on 127.0.0.1)")
    if web_port and not port_free(web_port):
        print(f"Port {web_port} is busy: the web UI takes a free port (printed below).", flush=True)
        web_port = 0
    services = start(checkpoint, logs, web_port)
    example = os.path.join(os.path.dirname(os.path.abspath(logs)), "data", "bench", "images", "eval-00000.png")
    print(f"\nModel {services.model_name} is served.\n  Web UI:     {services.web_url}\n"
          f"  OpenAI API: {services.controller_url}/v1 (model {services.model_name!r})\n"
          f"  Logs:       {os.path.abspath(logs)}\nAsk it about a held-out image, e.g. {example}:"
          f" 'What colour are the shapes?', 'Combien de formes y a-t-il ?', 'ما هذا الشكل؟'.\nPress Ctrl-C to stop.",
          flush=True)
    try:
        while all(p.poll() is None for p in services.processes):
            time.sleep(1.0)
        print(f"a service exited; see the logs in {logs}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    finally:
        services.stop()


def ask_served(api_base: str, model: str, bench: str, answers_dir: str, parallel: int = 8) -> int:
    """Put every held-out bench question, in every language, to the served model through its OpenAI API.

    Greedy (temperature 0), one image per question as a base64 data URL; concurrent requests exercise the
    worker's batching. Each language's answers go to ``<answers_dir>/<Language>.jsonl`` in ``model_vqa``'s
    format, written atomically, so :func:`palo.quickstart.exact_match.build_table` scores them like the offline run. A
    request the API refuses or fails is reported and left out, so the judge counts it as failed, never as right.

    Args:
        api_base: The controller's OpenAI-compatible base URL (``http://host:port/v1``).
        model: The served model name.
        bench: The bench root (``<root>/<language>/question.jsonl``, ``<root>/images``).
        answers_dir: Output folder.
        parallel: Requests in flight at once.

    Returns:
        The number of questions without an answer.
    """
    import base64
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI, OpenAIError
    from tqdm.auto import tqdm

    from palo.data.languages import LANGUAGES
    from palo.eval.bench import language_files
    from palo.eval.jsonl import iter_jsonl
    from palo.quickstart.exact_match import answers_path

    client = OpenAI(base_url=api_base, api_key="unused", max_retries=2, timeout=120)
    images: dict[str, str] = {}

    def data_url(path: str) -> str:
        if path not in images:
            with open(path, "rb") as f:
                images[path] = "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")
        return images[path]

    def ask(question: dict, image_folder: str) -> dict | None:
        content = [{"type": "image_url", "image_url": {"url": data_url(os.path.join(image_folder, question["image"]))}},
                   {"type": "text", "text": question["text"]}]
        try:
            reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                                   temperature=0.0, max_tokens=16)
        except OpenAIError as error:
            print(f"question {question['question_id']}: no answer ({error})", file=sys.stderr, flush=True)
            return None
        return {"question_id": question["question_id"], "prompt": question["text"],
                "text": reply.choices[0].message.content.strip(), "model_id": model, "metadata": {"served": True}}

    os.makedirs(answers_dir, exist_ok=True)
    unanswered = 0
    with ThreadPoolExecutor(parallel) as pool:
        for language in LANGUAGES:
            files = language_files(bench, language)
            questions = [r.data for r in iter_jsonl(files.questions, required=("question_id", "image", "text"))]
            rows = list(tqdm(pool.map(lambda q, images=files.images: ask(q, images), questions), total=len(questions),
                             desc=f"asking ({language})"))
            unanswered += rows.count(None)
            path = answers_path(answers_dir, language)
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                for row in rows:
                    if row is not None:
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
            os.replace(path + ".tmp", path)
    return unanswered


def check_served(checkpoint: str, workdir: str) -> int:
    """Start the services, score the served model on the held-out bench, write ``eval/served_summary.*``, stop."""
    from palo.quickstart import exact_match
    from palo.quickstart.pipeline import banner

    banner("Checking the served model (controller, worker, web UI; every held-out question via the OpenAI API)")
    services = start(checkpoint, os.path.join(workdir, "logs"))
    try:
        answers = os.path.join(workdir, "eval", "served_answers")
        unanswered = ask_served(services.controller_url + "/v1", services.model_name,
                                os.path.join(workdir, "data", "bench"), answers)
    finally:
        services.stop()
    table = exact_match.build_table(os.path.join(workdir, "data", "bench"), answers, f"{services.model_name} (served)")
    report = exact_match.write_report(table, os.path.join(workdir, "eval", "served_summary"))
    print()
    print(exact_match.to_markdown(table))
    print("written: " + ", ".join(report.values()), flush=True)
    return 1 if unanswered else 0
