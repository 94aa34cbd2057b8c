"""What the metadata server asks of containers: a VM's ticket and its one download.

``GET /hatchery/container`` (``ticket``) answers a container VM, once per boot, in lines its
init reads with the shell: ``image=``, ``token=``, ``ports=``. ``GET /hatchery/container/
bundle`` with the token in ``X-Hatchery-Container-Token`` (``download``) redeems the token
(``grants``), checks the image (``oci.check_image``, once per archive and tag, kept), and
streams the bundle (``bundle``). What becomes of the download is written to the VM's record
(``container_state``), a refusal of the image with its reason, so ``hatchery vm show`` says it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from hatchery.containers.bundle import bundle_chunks, bundle_size
from hatchery.containers.grants import Grants, Verdict
from hatchery.containers.oci import Archive, Image, ImageRefused, check_image, split_reference
from hatchery.containers.runtime import runtime_config
from hatchery.containers.store import ContainerStore
from hatchery.errors import HatcheryError

log = logging.getLogger(__name__)
CHECKED_CACHE = 64


class ContainerVm(Protocol):
    """The VM as the service needs it (``metadata.server.VmMetadata`` is one)."""

    @property
    def name(self) -> str: ...
    @property
    def uuid(self) -> str: ...
    @property
    def started(self) -> float: ...
    @property
    def container_image(self) -> str: ...
    @property
    def container_env(self) -> tuple[tuple[str, str], ...]: ...
    @property
    def container_ports(self) -> tuple[int, ...]: ...


class Refusal(HatcheryError):
    """A ticket or download refused; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Download:
    size: int
    chunks: AsyncGenerator[bytes, None]  # closed by its reader, even when cut short


Recorder = Callable[[str, str], Awaitable[None]]


class ContainerService:
    def __init__(self, store: ContainerStore, record: Recorder,
                 grants: Grants | None = None) -> None:  # fmt: skip
        self._store = store
        self._record = record
        self.grants = grants or Grants()
        self._checked: OrderedDict[tuple[str, str], Image] = OrderedDict()

    def ticket(self, vm: ContainerVm, now: float | None = None) -> str:
        if not vm.container_image:
            raise Refusal("this VM runs no container", 404)
        token = self.grants.issue(vm.uuid, vm.started, time.time() if now is None else now)
        if token is None:
            raise Refusal("this boot of the VM already has its container token", 410)
        ports = " ".join(str(p) for p in vm.container_ports)
        return f"image={vm.container_image}\ntoken={token}\nports={ports}\n"

    def _check(self, archive: Archive, sha256: str, tag: str) -> Image:
        key = (sha256, tag)
        if key in self._checked:
            self._checked.move_to_end(key)
            return self._checked[key]
        image = check_image(archive, tag)
        self._checked[key] = image
        while len(self._checked) > CHECKED_CACHE:
            self._checked.popitem(last=False)
        return image

    async def download(self, vm: ContainerVm, token: str, now: float | None = None) -> Download:
        if not vm.container_image:
            raise Refusal("this VM runs no container", 404)
        verdict = self.grants.redeem(token, vm.uuid, time.time() if now is None else now)
        if verdict is not Verdict.OK:
            log.warning("vm %s: container download refused: %s", vm.name, verdict)
            raise Refusal(f"{verdict}\n", 403 if verdict is Verdict.OTHER_VM else 410)
        await self._record(vm.name, "pulling")
        name, tag = split_reference(vm.container_image)
        archive: Archive | None = None
        try:
            stored = await asyncio.to_thread(self._store.resolve, name, tag)
            archive = await asyncio.to_thread(Archive, stored.path)
            image = await asyncio.to_thread(self._check, archive, stored.ref.sha256, tag)
            config = runtime_config(image.config, vm.name, dict(vm.container_env))
        except HatcheryError as exc:
            if archive is not None:
                archive.close()
            reason = f"refused: {exc.message}"
            log.warning("vm %s: container image %s %s", vm.name, vm.container_image, reason)
            await self._record(vm.name, reason)
            raise Refusal(f"{reason}\n", 422) from None
        log.info("vm %s: sending container image %s (%d layers, %d entries)", vm.name,
                 vm.container_image, len(image.layers), image.entries)  # fmt: skip
        return Download(
            bundle_size(image, config),
            self._stream(vm.name, archive, bundle_chunks(archive, image, config)),
        )

    async def _stream(self, vm: str, archive: Archive, chunks: Iterator[bytes]
                      ) -> AsyncGenerator[bytes, None]:  # fmt: skip
        try:
            while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
                yield chunk
            await self._record(vm, "pulled")
        except ImageRefused as exc:  # a blob changed on disk since it was checked
            await self._record(vm, f"refused: {exc.message}")
            raise
        finally:
            archive.close()
