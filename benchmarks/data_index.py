"""Start-up cost of a LLaVA-Pretrain-sized data file: time and peak memory to index it.

Issue 18's target: indexing a 558,128-record LLaVA-Pretrain-shaped JSON (~144 MB) takes <= 10 s and
<= 1 GB peak on the 2-core CPU machine (the previous eager loader: 131 s, 2.0 GB). The benchmark
writes such a file (``blip_laion_cc_sbu_558k.json``'s record shape: an id, an image path under a
separate image folder, a human turn with the ``<image>`` placeholder and a caption answer), then
measures in fresh processes, so each peak is that step's own:

* ``index``: ``LlavaJsonDataset(path, image_folder=...)`` (lazy: offsets and lines only);
* ``json.load``: the reference cost of merely parsing the file;
* ``records``: parsing and checking records one by one through the conversation layer, as a
  DataLoader worker does when it reads them (records per second; images not decoded).

Run: ``python -m benchmarks.data_index [--records N] [--out DIR]``; prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ["Render a clear and concise summary of the photo.", "Describe the image concisely.",
           "Give a brief description of the image.", "Share a concise interpretation of the image provided.",
           "Write a terse but informative summary of the picture."]
WORDS = ("select luxury furniture inch gel memory foam mattress topper the city of a view from river bank "
         "old man walking dog in park during autumn with colorful leaves").split()


def write_llava_pretrain(path: Path, n_records: int) -> None:
    """A LLaVA-Pretrain-shaped JSON array (indent 2, like the published file's layout)."""
    with open(path, "w") as file:
        file.write("[\n")
        for i in range(n_records):
            caption = " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(8 + i % 9))
            placeholder_first = i % 2 == 0
            prompt = PROMPTS[i % len(PROMPTS)]
            record = {"id": f"{i:09d}", "image": f"{i // 1000:05d}/{i:09d}.jpg",
                      "conversations": [{"from": "human",
                                         "value": f"<image>\n{prompt}" if placeholder_first else f"{prompt}\n<image>"},
                                        {"from": "gpt", "value": caption}]}
            text = json.dumps(record, indent=2)
            file.write("  " + text.replace("\n", "\n  ") + (",\n" if i < n_records - 1 else "\n"))
        file.write("]\n")


CHILD = r"""
import json, resource, sys, time
from pathlib import Path

def peak_mb():
    # VmHWM: this process's own peak resident memory. ru_maxrss is not used: Linux carries it
    # over fork + exec, so a child of a big process (a pytest worker) would report the parent's.
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

kind, path, images = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
t0 = time.perf_counter()
imported_mb = 0.0
if kind == "index":
    from minivlm.data.llava import LlavaJsonDataset
    imported_mb = peak_mb()
    t0 = time.perf_counter()  # the import is not the index
    dataset = LlavaJsonDataset(path, image_folder=images)
    count = len(dataset)
elif kind == "json.load":
    count = len(json.loads(path.read_bytes()))
else:
    from minivlm.data.file_dataset import decode_json
    from minivlm.data.llava import LlavaJsonDataset
    from minivlm.data.json_index import read_record
    from minivlm.data.sample import checked_llava
    dataset = LlavaJsonDataset(path, image_folder=images)
    data, index = dataset._file(), dataset.index
    t0 = time.perf_counter()
    count = min(20000, len(index))
    for i in range(count):
        record = decode_json(read_record(data, index, i), "x")
        checked_llava(record["conversations"], [record["image"]], require_assistant=True)
seconds = time.perf_counter() - t0
print(json.dumps({"kind": kind, "records": count, "seconds": seconds, "imported_mb": imported_mb,
                  "peak_mb": peak_mb()}))
"""


def measure(kind: str, path: Path, images: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", CHILD, kind, str(path), str(images)], capture_output=True,
                            text=True, env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=558_128)
    parser.add_argument("--out", help="write DIR/data_index.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path, images = Path(tmp) / "llava_pretrain.json", Path(tmp) / "images"
        images.mkdir()
        t0 = time.perf_counter()
        write_llava_pretrain(path, args.records)
        size_mb = path.stat().st_size / 2**20
        print(f"wrote {args.records:,} records ({size_mb:.0f} MiB) in {time.perf_counter() - t0:.1f} s")
        rows = [measure(kind, path, images) for kind in ("index", "json.load", "records")]
    print(f"\n{'step':<10} {'records':>9} {'seconds':>8} {'peak MB':>8}  per second")
    for row in rows:
        print(f"{row['kind']:<10} {row['records']:>9,} {row['seconds']:>8.2f} {row['peak_mb']:>8.0f}  "
              f"{row['records'] / row['seconds']:,.0f}")
    index = rows[0]
    verdict = index["seconds"] <= 10 and index["peak_mb"] <= 1024
    print(f"\nindex: the process peaks at {index['peak_mb']:.0f} MB, of which {index['imported_mb']:.0f} MB were "
          f"reached by importing minivlm (torch) before indexing")
    print(f"target (index <= 10 s and <= 1 GB peak): {'met' if verdict else 'NOT met'}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "data_index.json").write_text(json.dumps({"file_mb": size_mb, "rows": rows}, indent=2))
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
