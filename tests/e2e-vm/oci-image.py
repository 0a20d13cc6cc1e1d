#!/usr/bin/env python3
"""Write an OCI image layout tarball for `ctr images import`: one layer
holding a Wasm module at /hello.wasm, its entrypoint, named by
`io.containerd.image.name`. Used by tests/e2e-vm/shim-checks.sh (issue 20:
the shim's cgroup in the VM); standard library only.

    oci-image.py MODULE NAME OUT.tar
"""
import hashlib
import io
import json
import sys
import tarfile


def tar_bytes(files):
    """A plain (uncompressed) tar of (name, bytes), deterministic."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def main():
    module_path, name, out_path = sys.argv[1:4]
    module = open(module_path, "rb").read()
    blobs = {}

    def blob(media_type, data):
        digest = hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"mediaType": media_type, "digest": "sha256:" + digest, "size": len(data)}

    layer = tar_bytes([("hello.wasm", module)])
    layer_desc = blob("application/vnd.oci.image.layer.v1.tar", layer)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/hello.wasm"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]},
    }
    config_desc = blob("application/vnd.oci.image.config.v1+json", json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": [layer_desc],
    }
    manifest_desc = blob("application/vnd.oci.image.manifest.v1+json", json.dumps(manifest).encode())
    manifest_desc["annotations"] = {"io.containerd.image.name": name}
    index = {"schemaVersion": 2, "manifests": [manifest_desc]}
    files = [
        ("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
        ("index.json", json.dumps(index).encode()),
    ] + [("blobs/sha256/" + d, data) for d, data in blobs.items()]
    with open(out_path, "wb") as f:
        f.write(tar_bytes(files))


if __name__ == "__main__":
    main()
