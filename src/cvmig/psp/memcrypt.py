"""Guest memory encryption: what the memory controller does with a guest's VEK.

SEV encrypts each 16-byte block of guest memory with AES-128 and a tweak derived from the
block's physical address, so that the same plaintext at two addresses gives different
ciphertext. We emulate that with AES-XEX: C = E_K1(P ^ T) ^ T with T = E_K2(block index),
the block index (address / 16) as a 128-bit big-endian integer. The VEK is therefore
32 bytes (K1 ‖ K2), as for XTS.

Everything here is vectorised over many pages in one call. Because consecutive blocks have
consecutive indices, the tweaks of a run of contiguous pages are exactly the AES-CTR
keystream under K2 from the run's first block index: one reused CTR context makes them.
Scattered pages get theirs from one ECB pass over numpy-built counter blocks (same values).
The data takes one more ECB pass, so no Python loop runs per page.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

PAGE_SIZE = 4096
BLOCKS_PER_PAGE = PAGE_SIZE // 16
VEK_SIZE = 32

# Block indices of a page's 16-byte blocks, relative to the page's first block.
_BLOCK_STEPS = np.arange(BLOCKS_PER_PAGE, dtype=np.uint64)


class MemoryCipher:
    """Address-tweaked encryption of guest pages under one guest's VEK."""

    __slots__ = ("_data", "_data_dec", "_tweak_ecb", "_tweak_ctr", "_tbuf", "_xbuf", "_abuf",
                 "_zeros")

    def __init__(self, vek: bytes) -> None:
        if len(vek) != VEK_SIZE:
            raise ValueError(f"a VEK is {VEK_SIZE} bytes, got {len(vek)}")
        k1, k2 = vek[:16], vek[16:]
        self._data = Cipher(algorithms.AES(k1), modes.ECB()).encryptor()
        self._data_dec = Cipher(algorithms.AES(k1), modes.ECB()).decryptor()
        self._tweak_ecb = Cipher(algorithms.AES(k2), modes.ECB()).encryptor()
        self._tweak_ctr = Cipher(algorithms.AES(k2), modes.CTR(bytes(16))).encryptor()
        self._tbuf = np.empty(0, dtype=np.uint8)
        self._xbuf = np.empty(0, dtype=np.uint8)
        self._abuf = np.empty(0, dtype=np.uint64)
        self._zeros = np.empty(0, dtype=np.uint8)

    def _grow(self, need: int) -> None:
        if self._tbuf.size < need + 16:
            # ECB update_into wants block_size - 1 bytes of slack after the output.
            self._tbuf = np.empty(need + 16, dtype=np.uint8)
            self._xbuf = np.empty(need + 16, dtype=np.uint8)
            self._abuf = np.zeros(need // 8, dtype=np.uint64)
            self._zeros = np.zeros(need, dtype=np.uint8)

    def _tweaks(self, pfns: np.ndarray, n: int) -> np.ndarray:
        """T for every block of the given pages, shape (n, 4096) uint8 (a reused buffer)."""
        need = n * PAGE_SIZE
        self._grow(need)
        first = int(pfns[0])
        if is_run(pfns):
            # A contiguous run: the CTR keystream from its first block index.
            self._tweak_ctr.reset_nonce((first * BLOCKS_PER_PAGE).to_bytes(16, "big"))
            self._tweak_ctr.update_into(self._zeros[:need], self._tbuf[:need])  # type: ignore[arg-type]
        else:
            # Big-endian 128-bit counter blocks: high half zero, low half the index.
            blk = self._abuf[: need // 8].reshape(n, BLOCKS_PER_PAGE, 2)
            idx = np.asarray(pfns, dtype=np.uint64)[:, None] * np.uint64(BLOCKS_PER_PAGE)
            np.add(idx, _BLOCK_STEPS, out=blk[:, :, 1])
            if np.little_endian:
                blk[:, :, 1].byteswap(inplace=True)
            blk[:, :, 0] = 0
            self._tweak_ecb.update_into(blk.view(np.uint8).reshape(-1), self._tbuf)  # type: ignore[arg-type]
        return self._tbuf[:need].reshape(n, PAGE_SIZE)

    def encrypt_pages(self, pfns: np.ndarray, plaintext: np.ndarray, out: np.ndarray) -> None:
        """Encrypt pages (n, 4096) destined for guest frames ``pfns`` into ``out``.

        ``out`` may be a view into guest memory and may alias ``plaintext``.
        """
        self._apply(self._data, pfns, plaintext, out)

    def decrypt_pages(self, pfns: np.ndarray, ciphertext: np.ndarray, out: np.ndarray) -> None:
        """Decrypt pages (n, 4096) read from guest frames ``pfns`` into ``out``."""
        self._apply(self._data_dec, pfns, ciphertext, out)

    def _apply(self, ctx: object, pfns: np.ndarray, src: np.ndarray, out: np.ndarray) -> None:
        n = len(pfns)
        if n == 0:
            return
        if src.shape != (n, PAGE_SIZE) or out.shape != (n, PAGE_SIZE):
            raise ValueError(f"expected ({n}, {PAGE_SIZE}) pages, got {src.shape} -> {out.shape}")
        t = self._tweaks(pfns, n)
        need = n * PAGE_SIZE
        x = self._xbuf[:need].reshape(n, PAGE_SIZE)
        np.bitwise_xor(src, t, out=x)
        ctx.update_into(x.reshape(-1), self._xbuf)  # type: ignore[attr-defined]
        np.bitwise_xor(x, t, out=out)


def is_run(pfns: np.ndarray) -> bool:
    """Whether ``pfns`` (non-empty) are consecutive frames, in order."""
    n = len(pfns)
    return n == 1 or (int(pfns[-1]) - int(pfns[0]) == n - 1 and bool(np.all(np.diff(pfns) == 1)))


def page_array(buf: memoryview | bytearray | np.ndarray, npages: int) -> np.ndarray:
    """View a buffer of whole pages as an (npages, 4096) uint8 array, without copying."""
    return np.frombuffer(buf, dtype=np.uint8, count=npages * PAGE_SIZE).reshape(npages, PAGE_SIZE)
