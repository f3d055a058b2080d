"""When the client's pool asks for the kernel's receive times (_sockio), without opening a socket."""

from __future__ import annotations

from pytest_kvcache._http import StreamPool
from pytest_kvcache._sockio import kernel_stamps_available


def test_the_pool_stamps_in_the_kernel_only_for_plain_http_and_when_asked() -> None:
    assert StreamPool("http://127.0.0.1:1", 1).kernel_stamps is kernel_stamps_available()
    assert StreamPool("https://127.0.0.1:1", 1).kernel_stamps is False
    assert StreamPool("http://127.0.0.1:1", 1, kernel_stamps=False).kernel_stamps is False
