"""Make a Transformer Engine core wheel small enough to carry to the GPU machine (64 MiB a call).

`transformer-engine-cu13`'s wheel is 276 MB, and 264 MB of it is the `.nv_fatbin` section of
`libtransformer_engine.so`: one cubin per GPU architecture (sm_75 ... sm_120) for each of its 89
CUDA modules. A GPU only ever loads the cubin of its own architecture, so this script keeps the
entries of the architectures asked for (default: 90, Hopper: H100/H200), moves them to the front
of each module's fat binary, shrinks the module's size field and zeroes the rest. Offsets of the
modules, the code and the symbol tables are untouched; the zeros compress away.

    python scripts/te_slim_wheel.py transformer_engine_cu13-2.20.2-*.whl --arch 90 --out .whl_te/

The output is a valid wheel (RECORD updated) of the same name. On another architecture the
pruned library fails when it loads a kernel ("no kernel image is available"): keep the original
wheel for such machines.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import os
import struct
import sys
import tempfile
import zipfile

FATBIN_MAGIC = 0xBA55ED50
LIB = "transformer_engine/wheel_lib/libtransformer_engine.so"


def _section(elf: bytes, name: bytes) -> tuple[int, int]:
    """(file offset, size) of an ELF64 little-endian section."""
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    def header(i):
        return struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize)
    strtab_off = header(shstrndx)[4]
    for i in range(shnum):
        h = header(i)
        end = elf.index(b"\0", strtab_off + h[0])
        if elf[strtab_off + h[0]:end] == name:
            return h[4], h[5]
    raise ValueError(f"no {name.decode()} section")


def prune_fatbin(elf: bytearray, keep_archs: set[int]) -> tuple[int, int]:
    """Keep only cubins of `keep_archs` in every fat binary of `.nv_fatbin`; (kept, dropped) bytes."""
    off, size = _section(bytes(elf), b".nv_fatbin")
    pos, end_sec, kept, dropped = off, off + size, 0, 0
    while pos + 16 <= end_sec:
        magic, _version, hsz, fsz = struct.unpack_from("<IHHQ", elf, pos)
        if magic != FATBIN_MAGIC:
            pos += 8  # alignment padding between modules
            continue
        body, end = pos + hsz, pos + hsz + fsz
        entries, e = [], body
        while e < end:
            _kind, _ver, ehsz, psz = struct.unpack_from("<HHIQ", elf, e)
            arch = struct.unpack_from("<I", elf, e + 28)[0]
            entries.append((arch, bytes(elf[e:e + ehsz + psz])))
            e += ehsz + psz
        keep = [blob for arch, blob in entries if arch in keep_archs]
        if not keep:
            raise ValueError(f"a module at offset {pos:#x} has no cubin for sm_{sorted(keep_archs)} "
                             f"(it has {[a for a, _ in entries]})")
        packed = b"".join(keep)
        elf[body:end] = packed + bytes(fsz - len(packed))
        struct.pack_into("<Q", elf, pos + 8, len(packed))
        kept, dropped = kept + len(packed), dropped + fsz - len(packed)
        pos = end
    return kept, dropped


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def slim_wheel(src: str, out_dir: str, keep_archs: set[int]) -> str:
    dst = os.path.join(out_dir, os.path.basename(src))
    if os.path.abspath(dst) == os.path.abspath(src):
        raise ValueError(f"--out {out_dir} would overwrite the input wheel {src}")
    os.makedirs(out_dir, exist_ok=True)
    with zipfile.ZipFile(src) as zin:
        names = zin.namelist()
        if LIB not in names:
            raise ValueError(f"{src} has no {LIB}: not a transformer-engine core wheel")
        lib = bytearray(zin.read(LIB))
        kept, dropped = prune_fatbin(lib, keep_archs)
        lib = bytes(lib)
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".whl.tmp")
        os.close(fd)
        try:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
                for info in zin.infolist():
                    if info.filename == record:
                        continue
                    data = lib if info.filename == LIB else zin.read(info)
                    zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
                lines = []
                for line in zin.read(record).decode().splitlines():
                    path = line.split(",")[0]
                    lines.append(f"{LIB},{_record_hash(lib)},{len(lib)}" if path == LIB else line)
                zout.writestr(record, "\n".join(lines) + "\n")
            os.replace(tmp, dst)
        except BaseException:
            os.unlink(tmp)
            raise
    print(f"{dst}: kept {kept / 1e6:.1f} MB of cubins for sm_{sorted(keep_archs)}, dropped "
          f"{dropped / 1e6:.1f} MB; wheel {os.path.getsize(src) / 1e6:.1f} -> {os.path.getsize(dst) / 1e6:.1f} MB")
    return dst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("wheel", help="transformer_engine_cu12/cu13 wheel")
    ap.add_argument("--arch", default="90", help="comma-separated SM architectures to keep (default 90)")
    ap.add_argument("--out", required=True, help="output folder")
    args = ap.parse_args(argv)
    try:
        archs = {int(a) for a in args.arch.split(",")}
        slim_wheel(args.wheel, args.out, archs)
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        sys.exit(f"error: {e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
