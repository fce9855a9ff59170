import logging
import signal
import threading
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from memories.consumer_groups import GROUPS, consumer_for
from memories.events.consumers import default_consumer_name

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = (
        "Run the event stream's consumer groups (all of them, one thread each, unless --group). "
        "Stops cleanly on SIGTERM / SIGINT; --once processes what is there and exits."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--group", choices=GROUPS, help="Run only this group")
        parser.add_argument("--consumer", default=default_consumer_name(), help="Consumer name")
        parser.add_argument("--once", action="store_true", help="Drain, then exit")

    def handle(
        self, *args: Any, group: str | None, consumer: str, once: bool, **options: Any
    ) -> None:
        consumers = [
            consumer_for(name, consumer=consumer) for name in ([group] if group else GROUPS)
        ]
        if once:
            for each in consumers:
                self.stdout.write(f"{each.group}: {each.drain()} entries")
            return
        stop = threading.Event()
        crashed: list[str] = []

        def run(each: Any) -> None:
            try:
                each.run(stop)
            except Exception:
                logger.exception("consumer group %s crashed", each.group)
                crashed.append(each.group)
                stop.set()  # one group down takes the process down, for the supervisor to restart

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        threads = [threading.Thread(target=run, args=(each,), name=f"consumer-{each.group}")
                   for each in consumers]  # fmt: skip
        for thread in threads:
            thread.start()
        self.stderr.write(f"consuming {', '.join(c.group for c in consumers)} as {consumer}")
        while not stop.wait(0.5):  # a short wait, so the signal handler gets to run
            pass
        for thread in threads:
            thread.join()
        if crashed:
            raise SystemExit(1)
