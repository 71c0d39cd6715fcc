#!/usr/bin/env python3
"""Write an OCI image (an image-layout tar) from files on this machine, with no
daemon, no registry and nothing but the Python standard library.

    scripts/oci-image.py --name ambit.local/busybox:1.35.0 --output busybox.tar \\
        --add /bin/busybox:/bin/busybox --symlink /bin/sh:busybox \\
        --dir /tmp:1777 --entrypoint /bin/sh

    scripts/oci-image.py --name ambit.local/ztunnel:dev --output ztunnel.tar \\
        --add target/release/ztunnel:/usr/local/bin/ztunnel --with-libs \\
        --entrypoint /usr/local/bin/ztunnel --user 1337:1337

The image has one layer. `ctr -n k8s.io images import FILE` names it after
the `io.containerd.image.name` annotation of index.json (the --name given).
The output is reproducible: entries sorted, owner root, timestamps
SOURCE_DATE_EPOCH (default 0), gzip without a timestamp.

--with-libs adds, for every dynamically linked ELF file added, the shared
libraries `ldd` lists (and the program interpreter) at the paths ldd prints,
so a glibc-linked binary runs in an otherwise empty image.
"""

import argparse
import datetime
import gzip
import hashlib
import io
import json
import os
import platform
import re
import stat
import subprocess
import sys
import tarfile

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
GO_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}


class ImageError(Exception):
    pass


# ---------------------------------------------------------------- contents


class Layer:
    """The files of one layer: image path -> (kind, host path or target, mode)."""

    def __init__(self):
        self.entries = {}

    def _put(self, path, entry):
        path = normalize(path)
        old = self.entries.get(path)
        if old is not None and old != entry and not (old[0] == entry[0] == "dir"):
            raise ImageError(f"{path} added twice, differently: {old} and {entry}")
        self.entries[path] = entry

    def add_file(self, host, path, mode=None):
        st = os.stat(host)  # follows symlinks: the image gets the content
        if stat.S_ISDIR(st.st_mode):
            self.add_tree(host, path)
            return
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"{host}: not a regular file or directory")
        self._put(path, ("file", os.path.realpath(host), mode if mode is not None else st.st_mode & 0o7777))

    def add_tree(self, host, path):
        """A directory, recursively; symlinks inside it stay symlinks."""
        self.add_dir(path, os.stat(host).st_mode & 0o7777)
        for name in sorted(os.listdir(host)):
            h, p = os.path.join(host, name), path.rstrip("/") + "/" + name
            if os.path.islink(h):
                self.add_symlink(p, os.readlink(h))
            elif os.path.isdir(h):
                self.add_tree(h, p)
            else:
                self.add_file(h, p)

    def add_dir(self, path, mode=0o755):
        self._put(path, ("dir", None, mode))

    def add_symlink(self, path, target):
        self._put(path, ("symlink", target, 0o777))

    def files(self):
        return [(p, host) for p, (kind, host, _) in self.entries.items() if kind == "file"]

    def tar(self, mtime):
        """The uncompressed layer tar, parents before children, every parent
        directory present (runtimes expect them)."""
        entries = dict(self.entries)
        for path in list(entries):
            parent = os.path.dirname(path)
            while parent not in ("", "/") and parent not in entries:
                entries[parent] = ("dir", None, 0o755)
                parent = os.path.dirname(parent)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(entries):
                kind, src, mode = entries[path]
                info = tarfile.TarInfo(path.lstrip("/"))
                info.mode, info.mtime = mode, mtime
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                if kind == "dir":
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif kind == "symlink":
                    info.type, info.linkname = tarfile.SYMTYPE, src
                    tar.addfile(info)
                else:
                    info.size = os.path.getsize(src)
                    with open(src, "rb") as f:
                        tar.addfile(info, f)
        return buf.getvalue()


def normalize(path):
    if not path.startswith("/"):
        raise ImageError(f"image paths are absolute: {path}")
    path = os.path.normpath(path)
    if path == "/":
        raise ImageError("cannot add / itself")
    return path


# ---------------------------------------------------------------- ldd


def is_elf(path):
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def ldd_libs(path):
    """The shared libraries (and interpreter) `ldd` lists for PATH, as the
    absolute paths ldd prints; [] for a static binary or a non-ELF file."""
    if not is_elf(path):
        return []
    out = subprocess.run(["ldd", path], capture_output=True, text=True)
    text = out.stdout + out.stderr
    if "not a dynamic executable" in text or "statically linked" in text:
        return []
    if out.returncode != 0:
        raise ImageError(f"ldd {path} failed: {text.strip()}")
    libs = []
    for line in out.stdout.splitlines():
        line = line.strip()
        if "=> not found" in line:
            raise ImageError(f"{path}: library not found: {line}")
        m = re.match(r"^(?:\S+ => )?(/\S+) \(0x[0-9a-f]+\)$", line)
        if m:
            libs.append(m.group(1))
        elif line and not re.match(r"^\S+ \(0x[0-9a-f]+\)$", line):  # linux-vdso.so.1 (0x...)
            raise ImageError(f"ldd {path}: unexpected line: {line}")
    return libs


def with_libs(layer):
    """Add what ldd lists for every ELF file already in LAYER."""
    for _, host in layer.files():
        for lib in ldd_libs(host):
            layer.add_file(lib, lib, os.stat(lib).st_mode & 0o7777)


# ---------------------------------------------------------------- image


def blob(data):
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def build(layer, name, entrypoint, cmd, env, user, workdir, arch, mtime):
    """The blobs of an image: {digest: bytes}, and index.json's bytes."""
    raw = layer.tar(mtime)
    diff_id = "sha256:" + hashlib.sha256(raw).hexdigest()
    layer_digest, layer_gz = blob(gzip.compress(raw, compresslevel=9, mtime=0))
    created = "1970-01-01T00:00:00Z" if mtime == 0 else time_rfc3339(mtime)
    config = {"Env": env}
    if entrypoint:
        config["Entrypoint"] = entrypoint
    if cmd:
        config["Cmd"] = cmd
    if user:
        config["User"] = user
    if workdir:
        config["WorkingDir"] = workdir
    config_digest, config_json = blob(canonical({
        "created": created,
        "architecture": arch,
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": "scripts/oci-image.py"}],
    }))
    manifest_digest, manifest_json = blob(canonical({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": len(config_json)},
        "layers": [{"mediaType": MEDIA_LAYER, "digest": layer_digest, "size": len(layer_gz)}],
    }))
    tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else ""
    index = canonical({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [{
            "mediaType": MEDIA_MANIFEST,
            "digest": manifest_digest,
            "size": len(manifest_json),
            "platform": {"architecture": arch, "os": "linux"},
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    })
    blobs = {layer_digest: layer_gz, config_digest: config_json, manifest_digest: manifest_json}
    return blobs, index, manifest_digest


def write_layout_tar(output, blobs, index, mtime):
    """An OCI image layout (oci-layout, index.json, blobs/sha256/...) as a tar."""
    files = {"oci-layout": canonical({"imageLayoutVersion": "1.0.0"}), "index.json": index}
    for digest, data in blobs.items():
        files["blobs/sha256/" + digest.split(":", 1)[1]] = data
    tmp = output + ".tmp"
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, mtime
            tar.addfile(info)
        for path in sorted(files):
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(files[path]), 0o644, mtime
            tar.addfile(info, io.BytesIO(files[path]))
    os.replace(tmp, output)


def canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def time_rfc3339(t):
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------- command line


def split_pair(value, what):
    """HOST:IMAGE style pairs; IMAGE defaults to HOST when absent."""
    if ":" not in value:
        return value, None
    a, b = value.split(":", 1)
    if not a:
        raise ImageError(f"bad {what}: {value}")
    return a, b or None


def argv_list(value):
    """--entrypoint/--cmd: a JSON array, or one word."""
    if value is None:
        return None
    if value.startswith("["):
        v = json.loads(value)
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ImageError(f"not a JSON array of strings: {value}")
        return v
    return [value]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="image reference, e.g. ambit.local/pause:1 (never :latest)")
    p.add_argument("--output", required=True, help="the OCI image-layout tar to write")
    p.add_argument("--add", action="append", default=[], metavar="HOST[:IMAGE]",
                   help="a file or directory from this machine, at IMAGE (default: the same path)")
    p.add_argument("--symlink", action="append", default=[], metavar="IMAGE:TARGET",
                   help="a symbolic link in the image")
    p.add_argument("--dir", action="append", default=[], metavar="IMAGE[:MODE]",
                   help="an empty directory, MODE in octal (default 755)")
    p.add_argument("--with-libs", action="store_true",
                   help="add the shared libraries ldd lists for every added ELF file")
    p.add_argument("--entrypoint", help="JSON array, or a single path")
    p.add_argument("--cmd", help="JSON array, or a single word")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--user", help="UID[:GID] (or a name the image's /etc/passwd knows)")
    p.add_argument("--workdir")
    p.add_argument("--arch", default=GO_ARCH.get(platform.machine(), platform.machine()))
    return p.parse_args(argv)


def main(argv):
    a = parse_args(argv)
    if a.name.endswith(":latest") or ":" not in a.name.rsplit("/", 1)[-1]:
        raise ImageError(f"--name needs a tag other than latest (pull policy): {a.name}")
    for e in a.env:
        if "=" not in e:
            raise ImageError(f"--env wants KEY=VALUE: {e}")
    layer = Layer()
    for spec in a.add:
        host, path = split_pair(spec, "--add")
        if not os.path.exists(host):
            raise ImageError(f"no such file: {host}")
        layer.add_file(host, path or os.path.abspath(host))
    if a.with_libs:
        with_libs(layer)
    for spec in a.symlink:
        path, target = split_pair(spec, "--symlink")
        if not target:
            raise ImageError(f"--symlink wants IMAGE:TARGET: {spec}")
        layer.add_symlink(path, target)
    for spec in a.dir:
        path, mode = split_pair(spec, "--dir")
        layer.add_dir(path, int(mode, 8) if mode else 0o755)
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    blobs, index, digest = build(layer, a.name, argv_list(a.entrypoint), argv_list(a.cmd),
                                 a.env, a.user, a.workdir, a.arch, mtime)
    write_layout_tar(a.output, blobs, index, mtime)
    size = sum(len(b) for b in blobs.values())
    print(f"{a.name} {digest} ({len(layer.entries)} entries, {size} bytes) -> {a.output}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ImageError, OSError, json.JSONDecodeError) as e:
        print(f"oci-image: {e}", file=sys.stderr)
        sys.exit(1)
