"""Whole feature maps of the tiled VAE, kept in memory or in scratch files on disk.

The exact tiled VAE (:mod:`.tiling`) needs every feature map between two GroupNorms whole
(statistics over all tiles come before any tile is normalised). Such a map is a
(N, C, H, W) array of the map's resolution: for the SD decoder at full resolution 128
channels, 512 bytes per image px in fp32, up to three maps alive at once. Two stores:

- :class:`MemoryMap`: a tensor on a device (the CPU when computing on a GPU), fastest;
- :class:`DiskMap`: a file in a scratch folder, laid out (H, N, W, C) so that the rows of
  a tile window, all channels, are one contiguous run per row. A read or write moves just
  those runs with positional reads and writes (``os.preadv``/``os.pwritev``: one system
  call per run, straight between the tile's buffer and the OS page cache; where the OS has
  no such calls, or for a write of fewer channels than the file holds, through a memory
  map of the rows, opened and closed at once), so the process holds about one tile window
  of it at a time; the page cache may be dropped or written back by the kernel whenever
  memory is short. Memory then grows with the tile, and only disk use grows with the
  image. (Positional I/O measured 6-13x faster than the memory map for first writes and
  reads of 512 MB in 512-px windows, which fault in every page.)

Both give bit-identical values (a store keeps what was written, dtype for dtype).
"""
from __future__ import annotations

import logging
import os
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64,
          torch.bfloat16: np.int16}  # bf16 is kept as its raw 16 bits


class MemoryMap:
    """A (N, C, H, W) tensor; ``read``/``write`` address windows of it."""

    def __init__(self, t: Tensor) -> None:
        self.t = t

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.t.shape)  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        return self.t.numel() * self.t.element_size()

    def read(self, y0: int, y1: int, x0: int, x1: int, c0: int = 0, c1: int | None = None,
             device: torch.device | str | None = None, channels_last: bool = False) -> Tensor:
        """Window rows y0:y1, columns x0:x1, channels c0:c1 as (N, c, h, w): a view (in the
        map's own layout; ``channels_last`` is a hint the caller makes good), or a copy on
        ``device`` when that is another device."""
        v = self.t[:, c0:c1, y0:y1, x0:x1]
        return v if device is None else v.to(device)

    def write(self, y0: int, y1: int, x0: int, x1: int, t: Tensor) -> None:
        """Store ``t`` (N, c ≤ C, y1-y0, x1-x0) into the first c channels of the window."""
        self.t[:, :t.shape[1], y0:y1, x0:x1] = t.to(self.t.device, self.t.dtype)

    def head(self, channels: int) -> "MemoryMap":
        """The first ``channels`` channels, sharing storage (for writing over a map in place)."""
        return MemoryMap(self.t[:, :channels])

    def tensor(self) -> Tensor:
        return self.t


class ScratchDir:
    """A private folder for :class:`DiskMap` files, removed with everything in it when closed
    or collected. ``parent``: where to create it (default: the system temp folder)."""

    def __init__(self, parent: str | os.PathLike | None = None) -> None:
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        self._tmp = tempfile.TemporaryDirectory(prefix="srco-vae-", dir=parent)
        self.path = Path(self._tmp.name)
        self._count = 0
        fs = filesystem_type(self.path)
        if fs in ("tmpfs", "ramfs"):
            log.warning("the scratch folder %s is on a %s (kept in RAM): the disk store then saves no memory; "
                        "point --scratch-dir (or TMPDIR) at a real disk", self.path, fs)

    def new_file(self) -> Path:
        self._count += 1
        return self.path / f"map{self._count}.bin"

    def close(self) -> None:
        self._tmp.cleanup()


def filesystem_type(path: str | os.PathLike) -> str | None:
    """The type of the file system holding ``path`` ("ext4", "tmpfs", ...) from /proc/mounts; None elsewhere."""
    try:
        with open("/proc/mounts") as f:
            mounts = [line.split()[1:3] for line in f if len(line.split()) >= 3]
    except OSError:
        return None
    p = os.path.realpath(path)
    best: tuple[int, str | None] = (-1, None)
    for mount, fstype in mounts:
        mount = mount.replace("\\040", " ")
        if (p == mount or p.startswith(mount.rstrip("/") + "/")) and len(mount) > best[0]:
            best = (len(mount), fstype)
    return best[1]


_POSITIONAL_IO = hasattr(os, "preadv") and hasattr(os, "pwritev")
"""Whether the OS has positional vectored I/O (Linux, BSD, macOS); else memory maps (Windows)."""


class _File:
    """One scratch file, open for positional I/O while it lives; closed and deleted when the
    last map over it is collected."""

    def __init__(self, path: Path, nbytes: int) -> None:
        self.path = path
        self.fd: int | None = None
        if _POSITIONAL_IO:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.ftruncate(self.fd, nbytes)  # sparse: blocks are allocated as rows are written
            except OSError:
                os.close(self.fd)
                raise
        else:  # memory maps only (Windows): no handle held, so the folder can always be removed
            with open(path, "wb") as f:
                f.truncate(nbytes)
        self._fin = weakref.finalize(self, _close_unlink, self.fd, str(path))

    def pread(self, arr: np.ndarray, offset: int) -> None:
        """Fill the C-contiguous ``arr`` from the file at byte ``offset``."""
        mv = memoryview(arr).cast("B")
        done = 0
        while done < len(mv):
            got = os.preadv(self.fd, [mv[done:]], offset + done)
            if got <= 0:
                raise OSError(f"scratch file {self.path} ended {len(mv) - done} bytes early at {offset + done}")
            done += got

    def pwrite(self, arr: np.ndarray, offset: int) -> None:
        """Write the C-contiguous ``arr`` to the file at byte ``offset``."""
        mv = memoryview(arr).cast("B")
        done = 0
        while done < len(mv):
            done += os.pwritev(self.fd, [mv[done:]], offset + done)


def _close_unlink(fd: int | None, path: str) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
    try:
        os.unlink(path)
    except OSError:
        pass


class DiskMap:
    """A (N, C, H, W) map in a file laid out (H, N, W, C_file); this view is channels
    ``[0, C)`` of the file's ``C_file``. ``dtype``: the torch dtype of its values."""

    def __init__(self, file: _File, shape: tuple[int, int, int, int], dtype: torch.dtype,
                 file_channels: int | None = None) -> None:
        if dtype not in _NUMPY:
            raise TypeError(f"a disk store holds float32, float16, float64 or bfloat16 maps, not {dtype}")
        self.file, self.shape, self.dtype = file, tuple(shape), dtype
        self.file_channels = file_channels or shape[1]
        self._np = np.dtype(_NUMPY[dtype])

    @classmethod
    def create(cls, scratch: ScratchDir, shape: tuple[int, int, int, int], dtype: torch.dtype) -> "DiskMap":
        n, c, h, w = shape
        esize = torch.tensor([], dtype=dtype).element_size()
        return cls(_File(scratch.new_file(), n * c * h * w * esize), shape, dtype)

    @property
    def nbytes(self) -> int:
        n, _, h, w = self.shape
        return n * self.file_channels * h * w * self._np.itemsize

    def _rows(self, y0: int, y1: int, writable: bool) -> np.memmap:
        n, _, _, w = self.shape
        row = n * w * self.file_channels * self._np.itemsize
        return np.memmap(self.file.path, dtype=self._np, mode="r+" if writable else "r", offset=y0 * row,
                         shape=(y1 - y0, n, w, self.file_channels))

    def read(self, y0: int, y1: int, x0: int, x1: int, c0: int = 0, c1: int | None = None,
             device: torch.device | str | None = None, channels_last: bool = False) -> Tensor:
        """Window rows y0:y1, columns x0:x1, channels c0:c1 as a new (N, c, h, w) tensor on
        ``device`` (default: the CPU), contiguous; with ``channels_last`` in the file's own
        layout (for one image: ``torch.channels_last`` contiguous, no transposition at all).

        The file holds channels last: the window is copied out as it lies (one contiguous
        copy), moved to ``device`` as it is, and turned channels-first there unless
        ``channels_last`` (on a GPU the transposition costs nothing next to the copy; on the
        CPU it runs as a 2-D blocked transpose, 2-3x faster than a 4-D permuted copy)."""
        c1 = self.shape[1] if c1 is None else c1
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if y1 <= y0 or x1 <= x0 or c1 <= c0:
            return torch.empty((self.shape[0], max(0, c1 - c0), max(0, y1 - y0), max(0, x1 - x0)), dtype=self.dtype,
                               device=dev)
        a = self._read_rows(y0, y1, x0, x1, c0, c1)  # (h, N, w, c), owned
        t = torch.from_numpy(a)
        if self.dtype == torch.bfloat16:
            t = t.view(torch.bfloat16)
        t = t.to(dev).contiguous()  # a channel sub-range is copied out here (torch's copy, all threads)
        if not channels_last:
            return _channels_first(t)
        h, n, w, c = t.shape
        if n == 1:  # the canonical channels-last strides (the batch stride too: layout-sensitive kernels agree)
            return t.view(1, h, w, c).permute(0, 3, 1, 2)
        return t.permute(1, 3, 0, 2)

    def write(self, y0: int, y1: int, x0: int, x1: int, t: Tensor) -> None:
        """Store ``t`` (N, c ≤ C, y1-y0, x1-x0) into the first c channels of the window
        (turned channels-last where ``t`` lives, then one copy per row; a CPU tensor already
        channels-last, a cropped view too, is copied into the file as it is)."""
        if y1 <= y0 or x1 <= x0:
            return
        src = t.detach().to(dtype=self.dtype)
        if src.device.type == "cpu" and (src.shape[1] == 1 or src.stride(1) == 1):
            src = src.permute(2, 0, 3, 1)  # (h, N, w, c) view, channels innermost: numpy copies it as it lies
        else:
            src = _channels_last(src).cpu()
        if self.dtype == torch.bfloat16:
            src = src.view(torch.int16)
        a = src.numpy()  # (h, N, w, c)
        if self.file.fd is None or a.shape[-1] != self.file_channels or a.strides[-2:] != (
                self.file_channels * a.itemsize, a.itemsize):
            mm = self._rows(y0, y1, writable=True)  # fewer channels than the file: strided, via a map
            mm[:, :, x0:x1, :t.shape[1]] = a
            del mm
            return
        self._runs(self.file.pwrite, a, y0, x0, x1)

    def _runs(self, io: Callable[[np.ndarray, int], None], a: np.ndarray, y0: int, x0: int, x1: int) -> None:
        """Move the window ``a`` (h, N, x1 − x0, all channels) between memory and the file with
        ``io`` (the file's ``pread`` or ``pwrite``): whole rows in one run, else one per image row."""
        if x0 == 0 and x1 == self.shape[3] and a.flags.c_contiguous:
            io(a, self._offset(y0, 0, 0))
            return
        for i in range(a.shape[0]):
            for j in range(self.shape[0]):
                io(a[i, j], self._offset(y0 + i, j, x0))

    def _offset(self, y: int, n: int, x: int) -> int:
        """Byte offset of pixel (row y, image n, column x) in the file."""
        nn, _, _, w = self.shape
        return ((y * nn + n) * w + x) * self.file_channels * self._np.itemsize

    def _read_rows(self, y0: int, y1: int, x0: int, x1: int, c0: int, c1: int) -> np.ndarray:
        """Window as a new (h, N, w, c1 − c0) array (a strided view of the rows read when
        c0:c1 is not all of the file's channels)."""
        n = self.shape[0]
        if self.file.fd is None:
            mm = self._rows(y0, y1, writable=False)
            a = np.array(mm[:, :, x0:x1, c0:c1], copy=True)  # owned: the mapping can go
            del mm
            return a
        buf = np.empty((y1 - y0, n, x1 - x0, self.file_channels), dtype=self._np)
        self._runs(self.file.pread, buf, y0, x0, x1)
        return buf if (c0, c1) == (0, self.file_channels) else buf[..., c0:c1]

    def head(self, channels: int) -> "DiskMap":
        """The first ``channels`` channels, over the same file (for writing over a map in place)."""
        n, _, h, w = self.shape
        return DiskMap(self.file, (n, channels, h, w), self.dtype, self.file_channels)

    def tensor(self) -> Tensor:
        """The whole map as a (N, C, H, W) tensor in memory."""
        return self.read(0, self.shape[2], 0, self.shape[3]).contiguous()


def _channels_first(t: Tensor) -> Tensor:
    """(h, N, w, c) contiguous → contiguous (N, c, h, w), same values."""
    h, n, w, c = t.shape
    if n == 1:  # a 2-D transpose: ATen's blocked path
        return t.view(h * w, c).t().contiguous().view(1, c, h, w)
    return t.permute(1, 3, 0, 2).contiguous()


def _channels_last(t: Tensor) -> Tensor:
    """(N, c, h, w) → contiguous (h, N, w, c), same values."""
    n, c, h, w = t.shape
    if n == 1 and t.is_contiguous():
        return t.view(c, h * w).t().contiguous().view(h, 1, w, c)
    return t.permute(2, 0, 3, 1).contiguous()


FeatureMap = MemoryMap | DiskMap

__all__ = ["DiskMap", "FeatureMap", "MemoryMap", "ScratchDir"]
