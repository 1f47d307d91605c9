"""Write a one-layer docker-archive image (what `docker save` makes) holding one static binary.

`ctr images import` and `docker load` both read this format; no registry, no docker needed.
Used by hack/pause/build.sh for the pod sandbox image.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import tarfile


def layer_tar(binary: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        with open(binary, "rb") as f:
            data = f.read()
        info = tarfile.TarInfo("pause")
        info.size, info.mode, info.mtime = len(data), 0o755, 0
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--name", required=True, help="repository:tag")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    layer = layer_tar(args.binary)
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Entrypoint": ["/pause"],
            "User": "65535:65535",
            "Labels": {"dev.tpi.built-from": "k8s build/pause"},
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "gcc -static build/pause/linux/pause.c"}],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    layer_name = diff_id.split(":")[1] + "/layer.tar"
    manifest = [{"Config": config_name, "RepoTags": [args.name], "Layers": [layer_name]}]

    with tarfile.open(args.out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in (
            (config_name, config_bytes),
            (layer_name, layer),
            ("manifest.json", json.dumps(manifest).encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))


if __name__ == "__main__":
    main()
