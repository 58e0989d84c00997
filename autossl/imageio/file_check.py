"""Checks of a NIfTI file's own bytes, for what the readers hide.

SimpleITK (ITK's niftilib) reads NaN and inf voxels of a ``.nii``/``.nii.gz`` file as 0, and
reads a truncated ``.nii.gz`` without an error, filling the missing voxels with 0: training
would then see zeros where the file holds no valid data. ``check_nifti_file`` reads the file
once, as a stream (constant memory):

- ``.nii.gz``: the whole gzip stream is decompressed, and zlib checks each member's CRC-32 and
  length. A stream that ends early (a cut copy) or does not decompress (corrupt bytes, a CRC
  error) is an error;
- the voxel data must be as long as the header says (shape x bytes per voxel from
  ``vox_offset``): a shorter file is truncated (also an uncompressed ``.nii``, or a ``.nii.gz``
  made from a cut ``.nii``);
- float (and complex) voxels must be finite: NaN and inf are counted, with the first one's
  voxel index (NIfTI order, x fastest).

Its cost is one decompression of the file and, for float data, one ``isfinite`` pass over it.
A file whose header is not NIfTI is left to the reader, which reports it as unreadable.
Other formats (``.mha``, ``.nrrd``, ``.png``, ...) are not read here: their readers return NaN
and inf as they are, and the callers check the arrays.
"""
from __future__ import annotations

import io
import os
import zlib
from dataclasses import dataclass, field

import numpy as np

from autossl.imageio.base import ImageReadError

GZIP_MAGIC = b"\x1f\x8b"
_READ = 1 << 22          # compressed bytes read at a time
_MAX_OUT = 1 << 25       # decompressed bytes at a time (bounded memory for very compressible data)
NIFTI_ENDINGS = (".nii.gz", ".nii")


class ImageFileError(ImageReadError):
    """An image or label file whose content is damaged (truncated, corrupt) or not finite."""


@dataclass
class FileCheck:
    """What ``check_nifti_file`` found. Every problem is one line starting with the file."""
    path: str
    problems: list[str] = field(default_factory=list)
    damaged: bool = False      # truncated or corrupt: nothing read from the file can be trusted
    nonfinite: bool = False    # NaN or inf voxels (the rest of the file is intact)

    @property
    def ok(self) -> bool:
        return not self.problems


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_ENDINGS)


class _Truncated(Exception):
    pass


class _Corrupt(Exception):
    pass


def _gunzip(f):
    """Decompressed chunks of a (multi-member) gzip stream; raises _Truncated / _Corrupt."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip wrapper: zlib checks CRC-32 and length
    buf = b""
    file_done = False
    while True:
        if not buf and not file_done:
            buf = f.read(_READ)
            file_done = not buf
        try:
            out = d.decompress(buf, _MAX_OUT)
        except zlib.error as e:
            raise _Corrupt(str(e).replace("Error -3 while decompressing data: ", "")) from None
        buf = d.unconsumed_tail
        if out:
            yield out
        if d.eof:
            buf = d.unused_data + buf
            while len(buf) < 2 and not file_done:
                more = f.read(_READ)
                file_done = not more
                buf += more
            if buf[:2] != GZIP_MAGIC:  # the end (bytes after the last member are ignored, as by gzip)
                return
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            continue
        if not out and not buf and file_done:
            raise _Truncated()


def _plain(f):
    while True:
        chunk = f.read(_READ)
        if not chunk:
            return
        yield chunk


def _header_size(head: bytes) -> int | None:
    """348 (NIfTI-1) or 540 (NIfTI-2) from the first 4 bytes (either byte order), else None."""
    if len(head) < 4:
        return None
    sizes = (int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big"))
    return next((n for n in (348, 540) if n in sizes), None)


def _parse_header(head: bytes):
    """(dtype, shape, data offset) of a single-file NIfTI-1/-2 header, or None if it is not one."""
    import nibabel as nib

    n = _header_size(head)
    if n is None or len(head) < n:
        return None
    try:
        hdr = (nib.Nifti2Header if n == 540 else nib.Nifti1Header).from_fileobj(io.BytesIO(head[:n]), check=False)
        magic = bytes(hdr["magic"]).rstrip(b"\x00")
        if magic not in (b"n+1", b"n+2"):  # a .hdr/.img pair: not a single file
            return None
        dtype = hdr.get_data_dtype()
        shape = tuple(int(s) for s in hdr.get_data_shape())
        offset = max(int(hdr["vox_offset"]), n + 4)
    except Exception:  # a header nibabel cannot make sense of: the reader reports it
        return None
    return dtype, shape, offset


def _describe_nonfinite(n_nan: int, n_inf: int) -> str:
    return " and ".join(s for s in (f"{n_nan} NaN" if n_nan else "", f"{n_inf} inf" if n_inf else "") if s)


class _Scan:
    """Running state over the decompressed bytes of one file."""

    def __init__(self):
        self.early = b""        # bytes before the header could be parsed
        self.header = None      # (dtype, shape, offset)
        self.total = 0          # decompressed bytes seen
        self.data_seen = 0      # bytes of voxel data seen
        self.expected = None    # bytes of voxel data the header declares
        self.check_values = False
        self.pending = b""      # a partial voxel carried over to the next chunk
        self.elements = 0       # voxels checked so far
        self.n_nan = self.n_inf = 0
        self.first_bad = None

    def feed(self, chunk: bytes) -> bool:
        """Take the next chunk; False when the file turns out not to be NIfTI."""
        if self.header is None:
            self.early += chunk
            n = _header_size(self.early)
            if n is None:
                return len(self.early) < 4
            if len(self.early) < n:
                return True
            self.header = _parse_header(self.early)
            if self.header is None:
                return False
            dtype, shape, _ = self.header
            self.expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            self.check_values = dtype.kind in "fc" and dtype.fields is None
            chunk, self.early = self.early, b""
        start = self.total
        self.total += len(chunk)
        dtype, _, offset = self.header
        lo = max(offset - start, 0)
        hi = min(len(chunk), offset + self.expected - start)
        if hi <= lo:
            return True
        self.data_seen += hi - lo
        if not self.check_values:
            return True
        piece = self.pending + chunk[lo:hi] if self.pending else chunk[lo:hi]
        usable = len(piece) - len(piece) % dtype.itemsize
        self.pending = piece[usable:]
        if usable:
            arr = np.frombuffer(piece, dtype=dtype, count=usable // dtype.itemsize)
            finite = np.isfinite(arr)
            if not finite.all():
                self.n_nan += int(np.isnan(arr).sum())
                self.n_inf += int(np.isinf(arr).sum())
                if self.first_bad is None:
                    self.first_bad = self.elements + int(np.flatnonzero(~finite)[0])
            self.elements += arr.size
        return True


def check_nifti_file(path: str | os.PathLike, what: str = "image") -> FileCheck:
    """Read ``path`` (``.nii``/``.nii.gz``) once and report truncation, corruption and NaN/inf.

    ``what`` names the file in the messages ("image" or "label"). Bad content never raises; a
    file that cannot be opened raises OSError."""
    path = str(path)
    result = FileCheck(path)
    scan = _Scan()
    with open(path, "rb") as f:
        compressed = f.read(2) == GZIP_MAGIC
        f.seek(0)
        try:
            for chunk in (_gunzip(f) if compressed else _plain(f)):
                if not scan.feed(chunk):
                    return result  # not a NIfTI file: the reader reports it
        except _Truncated:
            result.damaged = True
            if scan.expected is not None:
                detail = f"{scan.data_seen} of the {scan.expected} bytes of voxel data its header declares"
            else:
                detail = f"{scan.total + len(scan.early)} bytes, before the header's end"
            result.problems.append(
                f"{path}: the file is truncated: its gzip stream ends before its end marker, after {detail}. "
                f"SimpleITK would read the missing voxels as 0; copy or convert the file again")
            return result
        except _Corrupt as e:
            result.damaged = True
            why = ""
            if "data check" in str(e):
                why = ": the CRC-32 checksum does not match the data"
            elif "length check" in str(e):
                why = ": the length stored in the file does not match the data"
            result.problems.append(f"{path}: the file is corrupt: its gzip data do not decompress ({e}){why}. "
                                   f"Copy or convert the file again")
            return result
    if scan.header is None:
        return result  # too short for a header: the reader reports it
    dtype, shape, offset = scan.header
    if scan.data_seen < scan.expected:
        result.damaged = True
        result.problems.append(
            f"{path}: the file is truncated: it holds {scan.data_seen} of the {scan.expected} bytes of voxel data "
            f"its header declares (shape {shape}, {dtype}, from byte {offset}). SimpleITK would read the missing "
            f"voxels as 0; copy or convert the file again")
        return result
    if scan.n_nan or scan.n_inf:
        result.nonfinite = True
        where = ""
        if scan.first_bad is not None and all(s > 0 for s in shape):
            idx = np.unravel_index(scan.first_bad, shape, order="F")
            where = f" (the first at voxel {tuple(int(i) for i in idx)}, NIfTI order)"
        result.problems.append(
            f"{path}: {what} contains {_describe_nonfinite(scan.n_nan, scan.n_inf)} value(s){where}. SimpleITK "
            f"reads NaN and inf in NIfTI files as 0, so autossl would train on zeros there; replace them in the "
            f"file (e.g. numpy.nan_to_num) or fix the conversion that produced them")
    return result


def check_files(files, labels=()) -> list[FileCheck]:
    """``check_nifti_file`` for every NIfTI file among ``files`` (images) and ``labels``."""
    out = []
    for f in files:
        if is_nifti(f):
            out.append(check_nifti_file(f, "image"))
    for f in labels:
        if f is not None and is_nifti(f):
            out.append(check_nifti_file(f, "label"))
    return out


def raise_for_files(files, labels=()) -> None:
    """Raise ``ImageFileError`` (all problems, one per line) if a NIfTI file is damaged or not finite."""
    problems = [p for c in check_files(files, labels) for p in c.problems]
    if problems:
        raise ImageFileError("\n".join(problems))


def nonfinite_problems(arr: np.ndarray, files, what: str = "image", skip=()) -> list[str]:
    """Per channel of ``arr`` (c, ...) whose values are not all finite: a line naming its file
    (files in ``skip``, already reported from their bytes, are left out). When the files hold
    several channels each (an RGB image), the line names the file(s) and the channel."""
    out = []
    if arr.dtype.kind not in "fc":
        return out
    files = [str(f) for f in files]
    one_each = len(files) == arr.shape[0]
    for c in range(arr.shape[0]):
        owner = files[c] if one_each else files[0] if len(files) == 1 else ", ".join(files)
        if owner in skip:
            continue
        ch = arr[c]
        if not np.isfinite(ch).all():
            what_ = _describe_nonfinite(int(np.isnan(ch).sum()), int(np.isinf(ch).sum()))
            out.append(f"{owner}: {what}{'' if one_each else f' channel {c}'} contains {what_} value(s)")
    return out


def damaged_file_error(path: str) -> ImageFileError | None:
    """For a file a reader failed on: ``ImageFileError`` saying that it is truncated or corrupt (a
    NIfTI file, checked on its bytes), else None. Costs nothing unless a read fails."""
    if not is_nifti(path):
        return None
    try:
        check = check_nifti_file(path)
    except OSError:
        return None
    return ImageFileError("\n".join(check.problems)) if check.damaged else None
