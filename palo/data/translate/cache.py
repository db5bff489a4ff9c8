"""The translation cache: every translation the moment it arrives, so a rerun after a kill sends nothing twice."""

from __future__ import annotations

import json
import time

from palo.openai_client import SqliteStore


class TranslationCache(SqliteStore):
    """Translations in SQLite, keyed by (model, language, masked source text); shared across runs.

    The source is the text as sent, numbers, coordinates and code replaced by ``[[n]]`` placeholders, and the
    translation is stored masked too (each text restores its own spans). Caches written before keys were masked hold
    restored translations under raw texts; the translator still reads those.

    Rejected translations are stored too, with their problems, so a rerun (or a run into a fresh output folder)
    reproduces the rejection without paying for the same failure again; ``--retry_rejected`` asks again instead.

    Args:
        path: The SQLite file (created), or None for no persistent cache.
    """

    SCHEMA = ("CREATE TABLE IF NOT EXISTS translations (model TEXT, language TEXT, source TEXT, translation TEXT, "
              "problems TEXT, created REAL, PRIMARY KEY (model, language, source))")

    def get(self, model: str, language: str, source: str) -> tuple[str, list[str]] | None:
        """(translation, problems) for a source text, problems empty for an accepted one; None when absent."""
        row = self._query("SELECT translation, problems FROM translations WHERE model=? AND language=? AND source=?",
                          (model, language, source))
        return (row[0], json.loads(row[1] or "[]")) if row else None

    def put(self, model: str, language: str, source: str, translation: str, problems: list[str] | None = None
            ) -> None:
        """Store one translation; committed at once, so a kill right after loses nothing that was paid for."""
        self._write("INSERT OR REPLACE INTO translations VALUES (?, ?, ?, ?, ?, ?)",
                    (model, language, source, translation, json.dumps(problems or [], ensure_ascii=False), time.time()))
