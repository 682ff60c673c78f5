"""What does reading shards over HTTP cost the training loader? Local disk vs a loopback server, cold and warm.

Measured in one process, back to back, on the same shards, batch size and worker count:

* local: ``build_train_loader`` on the shard folder (read in place);
* http cold: the same shards served by ``http.server.ThreadingHTTPServer`` on 127.0.0.1 (optionally throttled
  to ``--mbps`` MB/s per connection, to mimic object storage), an empty cache folder: every shard is
  downloaded whole (``mlip_dist.data.remote.ShardCache``) when first read;
* http warm: a second loader on the same cache folder: every shard is already there;
* pipe cold: ``pipe:cat <folder>/{}`` into an empty cache.

Each reads one epoch (every shard once) from step 0, first batch and worker start included; the best of
``--repeats`` runs (a cold run always starts from an empty cache) is reported as samples/s, samples/s per
worker and the ratio to local disk.

    python tools/bench_remote_loader.py                           # synthetic shards in a temp folder
    python tools/bench_remote_loader.py --mbps 0,50 --workers 1 --batch 16
    python tools/bench_remote_loader.py --shards /tmp/bench4/shards
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_loader import add_shard_arguments, small_preset_shards  # noqa: E402


class ThrottledHandler(http.server.SimpleHTTPRequestHandler):
    bytes_per_s = 0.0  # 0: as fast as loopback goes

    def log_message(self, *args):  # quiet
        pass

    def copyfile(self, source, outputfile):
        if not self.bytes_per_s:
            return super().copyfile(source, outputfile)
        chunk = 1 << 16
        start, sent = time.perf_counter(), 0
        while data := source.read(chunk):
            outputfile.write(data)
            sent += len(data)
            ahead = sent / self.bytes_per_s - (time.perf_counter() - start)
            if ahead > 0:
                time.sleep(ahead)


def start_server(folder: Path, mbps: float):
    handler = type("Handler", (ThrottledHandler,), {"bytes_per_s": mbps * 1e6})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def epoch_rate(base: str, tokenizer, model_cfg, batch: int, workers: int, cache_dir: str | None) -> tuple[float, int]:
    """(samples/s over one epoch from step 0, first batch included; steps of the epoch)."""
    from mlip_dist.data.loader import build_train_loader

    start = time.perf_counter()
    loader, steps = build_train_loader(
        base, "train", tokenizer=tokenizer, rank=0, world_size=1, micro_batch_size=batch, global_batch_size=batch,
        image_size=model_cfg.image.image_size, in_chans=model_cfg.image.in_chans,
        max_length=model_cfg.text.max_length, max_sentences=model_cfg.max_sentences, num_workers=workers,
        shuffle_buffer=64, seed=0, cache_dir=cache_dir, fetch_timeout_s=30.0, fetch_retries=2,
    )
    iterator = iter(loader)
    for _ in range(steps):
        batch_out = next(iterator)
        assert batch_out.num_lost == 0, batch_out.shard_errors
    elapsed = time.perf_counter() - start
    del iterator, loader
    return steps * batch / elapsed, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shard_arguments(parser, studies=120)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1, help="loader worker processes")
    parser.add_argument("--mbps", default="0,50", help="server throttles to compare, MB/s per connection (0: none)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement; the best is kept")
    args = parser.parse_args()

    with small_preset_shards(args, "bench_remote_") as (model_cfg, tokenizer, shards, scratch):
        tars = sorted(shards.glob("*.tar"))
        size = sum(p.stat().st_size for p in tars)
        print(f"shards {shards}: {len(tars)} tar files, {size / 1e6:.1f} MB; small preset "
              f"{model_cfg.image.image_size} px, batch {args.batch}, workers {args.workers}, cpu count "
              f"{os.cpu_count()}, load average {tuple(round(x, 2) for x in os.getloadavg())}")
        per = max(1, args.workers)

        def best(base: str, cache: str | None, cold: bool) -> float:
            rates = []
            for repeat in range(args.repeats):
                folder = f"{cache}-{repeat}" if cache and cold else cache
                rates.append(epoch_rate(base, tokenizer, model_cfg, args.batch, args.workers, folder)[0])
            return max(rates)

        local = best(str(shards), None, False)
        steps = epoch_rate(str(shards), tokenizer, model_cfg, args.batch, 0, None)[1]
        print(f"{'local disk':28s} {local:7.1f} samples/s, {local / per:7.1f} per worker  (1.00x local; "
              f"{steps} steps = one epoch)")
        rows = []
        for mbps in (float(m) for m in args.mbps.split(",")):
            server, url = start_server(shards, mbps)
            try:
                cache = str(Path(scratch) / f"cache-http-{mbps:g}")
                label = f"http {'unthrottled' if not mbps else f'{mbps:g} MB/s'}"
                rows.append((f"{label} cold", best(url, cache, cold=True)))
                rows.append((f"{label} warm", best(url, f"{cache}-0", cold=False)))  # filled by the cold run
            finally:
                server.shutdown()
                server.server_close()
        rows.append(("pipe:cat cold", best(f"pipe:cat {shards}/{{}}", str(Path(scratch) / "cache-pipe"), cold=True)))
        for label, rate in rows:
            print(f"{label:28s} {rate:7.1f} samples/s, {rate / per:7.1f} per worker  ({rate / local:.2f}x local)")
        print(f"load average after {tuple(round(x, 2) for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
