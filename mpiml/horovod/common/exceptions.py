"""`horovod.common.exceptions`: the errors Horovod scripts catch."""

from __future__ import annotations

from mpiml.errors import CommError


class HorovodInternalError(CommError):
    """A collective failed or the ranks' calls did not match; raised on every rank."""


class HostsUpdatedInterrupt(RuntimeError):  # noqa: N818 - Horovod's name
    """Elastic Horovod only; mpiml.horovod never raises it (elastic mode is not supported)."""

    def __init__(self, skip_sync: bool = False) -> None:
        super().__init__("hosts updated")
        self.skip_sync = skip_sync
