"""The rendered batch Indexed Job, run here: one process per completion index with the pod's command, arguments,
environment, mounted manifest and JOB_COMPLETION_INDEX (as the Job controller sets it), all writing into one
output folder: the shards are disjoint and together make every image of the manifest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import require_tool
from deploy_checks import K8S, lay_out_pod, named, pod_env, render


def test_the_indexed_job_shards_cover_the_manifest_once(tmp_path: Path) -> None:
    docs = render(K8S / "batch", require_tool("kubectl"))
    (job,) = named(docs, "Job")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    local = lay_out_pod(docs, pod, container, tmp_path / "pod")
    (manifest_map,) = named(docs, "ConfigMap")
    lines = [json.loads(line) for line in manifest_map["data"]["prompts.jsonl"].splitlines()]
    assert container["command"] == ["accel-diffusion"]
    argv = [sys.executable, "-m", "accel_diffusion.cli", *(local(a) for a in container["args"])]
    completions = job["spec"]["completions"]
    written = []
    for index in range(completions):
        env = pod_env(container, local) | {"JOB_COMPLETION_INDEX": str(index)}
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"(shard {index} of {completions})" in done.stderr
        out = Path(local("/outputs/run"))
        records = (out / f"results.shard-{index}-of-{completions}.jsonl").read_text().splitlines()
        written.append([json.loads(record)["id"] for record in records])
    ids = [i for shard in written for i in shard]
    assert all(written) and sorted(ids) == sorted(line["id"] for line in lines)  # disjoint, complete
    images = sorted(p.name for p in (out / "images").iterdir())
    assert images == sorted(f"{line['id']}-{k}.png" for line in lines for k in range(line["n"]))
    assert not (out / "errors.jsonl").exists() or (out / "errors.jsonl").read_text() == ""
