"""The baseline: a bare pyfuse3 filesystem serving one small static file, uncached
(attr_timeout 0, direct_io) like deployfs's state files, so the ratio isolates
what deployfs adds per request."""

import errno
import signal
import stat
import sys

import pyfuse3
import trio

DATA = b"8b1e0d4a91c2\n"


class Bare(pyfuse3.Operations):
    def _attrs(self, ino):
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_mode = (stat.S_IFDIR | 0o555) if ino == pyfuse3.ROOT_INODE else (stat.S_IFREG | 0o444)
        a.st_size = 0 if ino == pyfuse3.ROOT_INODE else len(DATA)
        a.attr_timeout = a.entry_timeout = 0
        return a

    async def getattr(self, inode, ctx=None):
        return self._attrs(inode)

    async def lookup(self, parent, name, ctx=None):
        if parent != pyfuse3.ROOT_INODE or name != b"version":
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(2)

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode, direct_io=True)

    async def read(self, fh, off, size):
        return DATA[off:off + size]

    async def release(self, fh):
        pass


async def main(mnt):
    pyfuse3.init(Bare(), mnt, set(pyfuse3.default_options) | {"fsname=barefs"})
    try:
        async with trio.open_nursery() as n:
            async def stop():
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                    async for _ in sigs:
                        pyfuse3.terminate()
                        return
            n.start_soon(stop)
            await pyfuse3.main()
            n.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
