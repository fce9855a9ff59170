"""`manage.py reembed`: re-embed every memory with the configured embedder (memories.reembed)."""

from __future__ import annotations

import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from memories import reembed
from memories.providers import ProviderError
from memories.providers.wiring import get_embedder


class Command(BaseCommand):
    help = (
        "Re-embed every live memory with the configured embedder (EMBEDDING_PROVIDER, "
        "EMBEDDING_DIMENSIONS) in batches, then swap the new vectors in. Search keeps answering "
        "meanwhile; run it again after an interruption and it resumes."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--batch-size", type=int, default=256, help="Texts per embedding call")
        parser.add_argument(
            "--limit", type=int, default=None, help="Stop after this many texts (resume later)"
        )
        parser.add_argument(
            "--force", action="store_true", help="Re-embed even if the vectors are this embedder's"
        )
        parser.add_argument(
            "--status", action="store_true", help="Show the stored and target embedders, and stop"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["batch_size"] < 1 or (options["limit"] is not None and options["limit"] < 1):
            raise CommandError("--batch-size and --limit must be positive")
        spec = reembed.configured_embedder()
        stored = reembed.stored_embeddings()
        if stored is None:
            raise CommandError("the memories table does not exist yet: run `manage.py migrate`")
        under_way = stored.next_embedder and f", re-embedding to {stored.next_embedder} under way"
        self.stdout.write(
            f"stored: {stored.embedder or 'unrecorded'} (vector({stored.dimensions}))"
            f"{under_way or ''}; configured: {spec.label}"
        )
        if options["status"]:
            return
        if reembed.is_current(stored, spec) and not options["force"]:
            self.stdout.write("nothing to do: the vectors are the configured embedder's")
            return
        embedder = get_embedder()  # first: loading a model is no part of the rate
        bar = _ProgressBar(self.stderr)
        try:
            result = reembed.memories_reembed(
                embedder=embedder,
                spec=spec,
                batch_size=options["batch_size"],
                limit=options["limit"],
                force=options["force"],
                on_batch=bar.update,
            )
        except (reembed.ReembedError, ProviderError) as exc:
            bar.close()
            raise CommandError(f"{exc} (the memories done so far are kept: run it again)") from exc
        bar.close()
        if result.started_over:
            self.stdout.write("a re-embedding for another embedder was under way: started over")
        if result.state == "unchanged":
            self.stdout.write(f"the {result.total} memories' vectors are {spec.label}'s already")
        elif result.state == "stopped":
            self.stdout.write(
                f"stopped after {result.embedded} texts: {result.done} of {result.total} done; "
                "run it again to go on"
            )
        else:
            self.stdout.write(f"{result.total} memories re-embedded with {spec.label}")


class _ProgressBar:
    """One line on stderr, rewritten after each batch: done/total, percent, texts per second."""

    def __init__(self, stream: Any, width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.started = time.monotonic()
        self.shown = False

    def update(self, progress: reembed.Progress) -> None:
        total = max(progress.total, 1)
        filled = int(self.width * min(progress.done / total, 1))
        rate = progress.embedded / max(time.monotonic() - self.started, 1e-6)
        self.stream.write(
            f"\rreembed [{'#' * filled}{'.' * (self.width - filled)}] "
            f"{progress.done}/{progress.total} {100 * progress.done / total:.0f}% "
            f"{rate:.0f} texts/s",
            ending="",
        )
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("")
