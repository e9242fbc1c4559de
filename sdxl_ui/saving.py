"""Saving images: the output-path check the CLI and the Python API share, and the atomic PNG write (a temporary
file in the same folder, then a rename), so no crash, full disk or signal leaves a half-written PNG."""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
import tempfile
from pathlib import Path

from .metadata import ImageParameters, save_png
from .schema import ValidationError


def check_output_path(path: str | Path) -> Path:
    """An explicit output file, checked before minutes of work: a .png in an existing, writable folder.

    One rule for the CLI and the Python API: a relative path is relative to the current folder, as for ``open()``
    and any shell tool (the outputs folder holds only the names the service picks itself).
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ValidationError("output_path", path, "must be a file path ending in .png")
    raw = str(path)
    if "\x00" in raw:
        raise ValidationError("output_path", raw, "must not contain a NUL character")
    if Path(raw).suffix.lower() != ".png":
        raise ValidationError("output_path", raw, "must end with .png (PNG keeps the parameters chunk)")
    try:
        target = Path(raw).expanduser().absolute()
        if target.is_dir():
            raise ValidationError("output_path", raw, "is a folder; give a file name ending in .png")
        parent = target.parent
        if not parent.is_dir():
            raise ValidationError("output_path", raw, f"folder {str(parent)!r} does not exist")
    except (OSError, ValueError) as exc:  # e.g. a name too long for the file system, undecodable bytes
        if isinstance(exc, ValidationError):
            raise
        raise ValidationError("output_path", raw, f"cannot be used ({exc})") from None
    try:  # os.access says yes to root everywhere; only a real file creation tells
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise ValidationError("output_path", raw, f"folder {str(parent)!r} is not writable ({exc.strerror})") from None
    return target


def write_png_atomic(image, path: Path, params: ImageParameters, extra: dict, overwrite: bool) -> None:
    """The PNG with its ``parameters`` chunk, written by ``write_atomic``."""
    write_atomic(path, lambda f: save_png(image, f, params, extra), overwrite)


def write_atomic(path: Path, write, overwrite: bool) -> None:
    """``write(file)`` into a hidden temporary file in the same folder, then rename it into place, so no reader and no
    crash, full disk or signal ever leaves a half-written PNG under ``path``; the temporary file goes on any error.

    ``overwrite=False`` never replaces an existing file (FileExistsError): a hard link is the atomic
    "create if absent" for a finished file. On file systems without hard links the name is reserved first and
    the finished file renamed over the reservation.
    """
    # Not mkstemp: its 0600 mode would make the PNG private; os.open applies the umask like any new file.
    tmp = path.with_name(f".{path.stem}.{secrets.token_hex(6)}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
                raise
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))  # reserve the name (FileExistsError)
            os.replace(tmp, path)
            return
        os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_png_copy(image, path: Path, source, postprocessing: str) -> None:
    """An upscaled picture written as ``write_png_atomic`` writes (never half a file; replacing ``path``), keeping
    the source's ``parameters`` chunk and adding A1111's ``postprocessing`` one (what the upscale did)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    parameters = getattr(source, "info", {}).get("parameters")
    if isinstance(parameters, str):
        info.add_text("parameters", parameters)
    info.add_text("postprocessing", postprocessing)
    write_atomic(path, lambda f: image.save(f, format="PNG", pnginfo=info), overwrite=True)
