"""The output folder of a batch run, written so that a crash at any instant leaves no partial file.

    OUT/images/<name>-<k>.<ext>     image k of a request; <name> is its line's id, or its key
    OUT/ids/<id>.key                which request's images carry the name <id> (written first)
    OUT/results/<key>.json          the request's result record: written last, so it marks it done
    OUT/results[.shard-I-of-N].jsonl  every finished request of the manifest (of this shard), by line
    OUT/errors[.shard-I-of-N].jsonl   invalid lines and failed requests, with their line numbers

Every file is written to ``OUT/.tmp/`` first, flushed to disk and renamed into place (atomic on
POSIX). A request whose result record exists is skipped by a rerun; one killed after some of its
images were renamed is generated again and its images are replaced by the same bytes (seeds are
fixed per request), so no image is ever duplicated or half-written. Images named by an id are
claimed for their request (``ids/<id>.key``) before they are written: when an edited manifest gives
that id to another request, the earlier request's record no longer counts as done.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from accel_diffusion.imageio import EXTENSIONS


class BatchOutputs:
    def __init__(self, out_dir: str | Path, shard_index: int = 0, num_shards: int = 1) -> None:
        self.root = Path(out_dir)
        self.images = self.root / "images"
        self.results = self.root / "results"
        self.tmp = self.root / ".tmp"
        for folder in (self.images, self.results, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)
        self.suffix = f".shard-{shard_index}-of-{num_shards}" if num_shards > 1 else ""
        self._tmp_prefix = f"shard{shard_index}-"
        for stale in self.tmp.glob(self._tmp_prefix + "*"):  # left by a killed run of this shard
            stale.unlink(missing_ok=True)

    def is_done(self, key: str) -> bool:
        """The request has its record, and the images it lists are still its own."""
        if not (self.results / f"{key}.json").is_file():
            return False
        name = self.record(key).get("output_name", key)
        return name == key or self._owner(name) == key

    def record(self, key: str) -> dict[str, Any]:
        return json.loads((self.results / f"{key}.json").read_text())

    def image_name(self, name: str, index: int, output_format: str) -> str:
        return f"{name}-{index}.{EXTENSIONS[output_format]}"

    def write_request(self, key: str, images: list[bytes], output_format: str, record: dict[str, Any],
                      name: str | None = None) -> list[str]:
        """Images named ``name`` (default: the key), then the result record (with the image paths,
        relative to OUT); returns the paths."""
        name = name or key
        if name != key:  # claim the name first: a crash after this leaves no other request done with it
            (self.root / "ids").mkdir(exist_ok=True)
            self._write_atomic(self.root / "ids" / f"{name}.key", key.encode())
        paths = []
        for index, data in enumerate(images):
            file_name = self.image_name(name, index, output_format)
            self._write_atomic(self.images / file_name, data)
            paths.append(f"images/{file_name}")
        self._write_atomic(self.results / f"{key}.json", _json_bytes({**record, "output_name": name,
                                                                       "files": paths}))
        return paths

    def _owner(self, name: str) -> str | None:
        try:
            return (self.root / "ids" / f"{name}.key").read_text()
        except FileNotFoundError:
            return None

    def write_summaries(self, records: list[dict[str, Any]], errors: list[dict[str, Any]]) -> tuple[Path, Path]:
        results_path = self.root / f"results{self.suffix}.jsonl"
        errors_path = self.root / f"errors{self.suffix}.jsonl"
        by_line = sorted(records, key=lambda r: r["line"])
        self._write_atomic(results_path, b"".join(_json_bytes(r) + b"\n" for r in by_line))
        self._write_atomic(errors_path, b"".join(_json_bytes(e) + b"\n" for e in sorted(errors, key=_line)))
        return results_path, errors_path

    def _write_atomic(self, path: Path, data: bytes) -> None:
        tmp = self.tmp / f"{self._tmp_prefix}{os.getpid()}-{uuid.uuid4().hex}"
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)


def _json_bytes(value: dict[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True, ensure_ascii=False).encode()


def _line(error: dict[str, Any]) -> int:
    return int(error["line"])
