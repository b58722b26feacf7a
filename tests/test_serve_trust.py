"""The prediction API trusts nothing it is handed: clients added at once, router keys anyone could compute,
images of every PNG kind (decoded by their own bit depth, at a cost bounded by the model's size), and a damaged
ledger at start-up."""

from __future__ import annotations

import multiprocessing
import os
import re
import socket
import sqlite3
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import uvicorn
import yaml

from edm_lightning import __main__ as dispatcher
from edm_lightning.defense import VictimConfig
from edm_lightning.errors import ConfigError
from edm_lightning.models import EnsembleModule
from edm_lightning.routing import resolve_router_key
from edm_lightning.serve import SqliteLedger, add_client, key_digest, load_clients
from edm_lightning.serve import images as png_module
from edm_lightning.serve.__main__ import ServeConfig, build_app
from edm_lightning.serve.__main__ import main as serve_main
from edm_lightning.serve.images import MAX_PNG_CHUNKS, UnsupportedImage, decode_png_body
from tests.helpers.server import ROUTER_KEY, Server

GOOD_KEY = "3f0c9a51d27e48b6a1c5e09f7d3b2a86"  # 32 hex digits, as the message tells operators to make one


@pytest.fixture(autouse=True)
def never_listen(monkeypatch):
    """An in-process server that got past its checks returns at once instead of listening (its log says so)."""
    monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets: print("LISTENING", file=sys.stderr))


# ---------------------------------------------------------------------------------------------------------- PNG files
def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def pack_row(samples: np.ndarray, depth: int) -> bytes:
    """One scanline's samples packed at ``depth`` bits, after its filter byte (0: none)."""
    if depth == 16:
        return b"\x00" + samples.astype(">u2").tobytes()
    if depth == 8:
        return b"\x00" + samples.astype(np.uint8).tobytes()
    per_byte = 8 // depth
    padded = np.zeros(-(-samples.size // per_byte) * per_byte, dtype=np.int64)
    padded[:samples.size] = samples
    shifts = np.arange(per_byte)[::-1] * depth
    return b"\x00" + (padded.reshape(-1, per_byte) << shifts).sum(axis=1).astype(np.uint8).tobytes()


def image_data(pixels: np.ndarray, depth: int, interlaced: bool = False) -> bytes:
    """The uncompressed scanlines of ``pixels`` (H, W, samples), in Adam7's seven passes when ``interlaced``."""
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    raw = b""
    for x0, y0, dx, dy in passes if interlaced else ((0, 0, 1, 1),):
        part = pixels[y0::dy, x0::dx]
        if part.size:
            raw += b"".join(pack_row(row.reshape(-1), depth) for row in part)
    return raw


def png_file(pixels: np.ndarray, depth: int, color_type: int, *, extra: bytes = b"", idat: bytes | None = None,
             interlaced: bool = False) -> bytes:
    """A PNG of ``pixels`` (H, W) or (H, W, samples) written by hand, so every colour type and bit depth can be made."""
    pixels = pixels.reshape(*pixels.shape[:2], -1)
    header = struct.pack(">IIBBBBB", pixels.shape[1], pixels.shape[0], depth, color_type, 0, 0, int(interlaced))
    if idat is None:
        idat = zlib.compress(image_data(pixels, depth, interlaced))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + extra + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def grey_values(depth: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**depth, size=(28, 28))


def bomb(inflated_mib: int) -> bytes:
    """A PNG whose header is a valid 28x28 grey image and whose image data inflates to ``inflated_mib`` MiB of zeros.

    Built in milliseconds: after a full flush, deflate encodes each MiB of zeros as the same block, and the
    stream's Adler-32 of ``n`` zeros is ``(n mod 65521) << 16 | 1``.
    """
    deflate, zeros = zlib.compressobj(9), bytes(1 << 20)
    first = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)  # with the zlib header
    block = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    adler = ((inflated_mib << 20) % 65521) << 16 | 1
    data = first + block * (inflated_mib - 1) + b"\x03\x00" + struct.pack(">I", adler)  # an empty last block, checksum
    return png_file(np.zeros((28, 28)), 8, 0, idat=data)


def test_the_bomb_is_what_it_says():
    inflater = zlib.decompressobj()
    assert len(inflater.decompress(bomb(64)[41:-16])) == 64 << 20 and inflater.eof and not inflater.unused_data


@pytest.mark.parametrize("depth", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("interlaced", [False, True])
def test_grey_pngs_are_scaled_by_their_own_bit_depth(depth, interlaced):
    values = grey_values(depth)
    x = decode_png_body(png_file(values, depth, 0, interlaced=interlaced), (1, 28, 28))
    assert x.dtype == torch.float32 and x.shape == (1, 1, 28, 28)
    assert torch.equal(x[0, 0], torch.from_numpy(values).float() / (2**depth - 1))


def test_a_16_bit_png_of_200_is_200_of_65535_not_200_of_255():
    x = decode_png_body(png_file(np.full((28, 28), 200), 16, 0), (1, 28, 28))
    assert torch.equal(x, torch.full((1, 1, 28, 28), 200 / 65535))


def test_palette_and_colour_pngs_of_grey_pixels_are_those_grey_images_and_other_colours_are_refused():
    values = grey_values(8)
    grey = torch.from_numpy(values).float() / 255
    palette = chunk(b"PLTE", bytes(np.repeat(np.arange(256), 3).astype(np.uint8)))  # entry i is grey i
    assert torch.equal(decode_png_body(png_file(values, 8, 3, extra=palette), (1, 28, 28))[0, 0], grey)
    small = chunk(b"PLTE", bytes([0, 0, 0, 255, 255, 255, 51, 51, 51]))  # a 2-bit palette: black, white, 20% grey
    indices = np.random.default_rng(1).integers(0, 3, size=(28, 28))
    expected = torch.tensor([0.0, 1.0, 0.2])[torch.from_numpy(indices)]
    assert torch.equal(decode_png_body(png_file(indices, 2, 3, extra=small), (1, 28, 28))[0, 0], expected)
    rgb = np.repeat(values[..., None], 3, axis=2)
    assert torch.equal(decode_png_body(png_file(rgb, 8, 2), (1, 28, 28))[0, 0], grey)
    with pytest.raises(UnsupportedImage, match="16-bit colour"):  # the decoder would keep 8 of its 16 bits
        decode_png_body(png_file(np.repeat((values * 256 + 7)[..., None], 3, axis=2), 16, 2), (1, 28, 28))
    coloured = rgb.copy()
    coloured[3, 4] = (10, 200, 30)
    with pytest.raises(UnsupportedImage, match="colour image and the model takes grey"):
        decode_png_body(png_file(coloured, 8, 2), (1, 28, 28))
    red = chunk(b"PLTE", bytes([255, 0, 0, 0, 0, 0]))
    with pytest.raises(UnsupportedImage, match="colour image"):
        decode_png_body(png_file(np.zeros((28, 28)), 8, 3, extra=red), (1, 28, 28))  # every pixel red
    as_colour = decode_png_body(png_file(values, 8, 0), (3, 28, 28))  # a colour model takes a grey image as grey RGB
    assert as_colour.shape == (1, 3, 28, 28) and all(torch.equal(as_colour[0, c], grey) for c in range(3))


TRANSPARENT = dict([
    ("grey and alpha", png_file(np.full((28, 28, 2), 255), 8, 4)),
    ("RGBA", png_file(np.full((28, 28, 4), 255), 8, 6)),
    ("16-bit RGBA", png_file(np.full((28, 28, 4), 65535), 16, 6)),
    ("grey with tRNS", png_file(np.zeros((28, 28)), 8, 0, extra=chunk(b"tRNS", b"\x00\x00"))),
    ("palette with tRNS", png_file(np.zeros((28, 28)), 8, 3, extra=chunk(b"PLTE", bytes(3)) + chunk(b"tRNS", b"\x00"))),
])


@pytest.mark.parametrize("name", list(TRANSPARENT))
def test_transparency_is_refused(name):
    with pytest.raises(UnsupportedImage, match="transparency"):
        decode_png_body(TRANSPARENT[name], (1, 28, 28))


MALFORMED = {name: (body, message) for name, body, message in [
    ("3-bit grey", png_file(np.zeros((28, 28)), 3, 0, idat=zlib.compress(bytes(812))), "invalid PNG header: bit depth 3"),
    ("palette without PLTE", png_file(np.zeros((28, 28)), 8, 3), "no PLTE chunk"),
    ("truncated data", png_file(np.zeros((28, 28)), 8, 0, idat=zlib.compress(image_data(grey_values(8)[..., None], 8))[:-30]),
     "truncated: 7.. of the 812"),
    ("short data", png_file(np.zeros((28, 28)), 8, 0, idat=zlib.compress(bytes(28 * 29 - 1))), "truncated: 811 of the 812"),
    ("data after the stream", png_file(np.zeros((28, 28)), 8, 0, idat=zlib.compress(bytes(812)) + bytes(1000)),
     "1000 bytes after the end"),
    ("not zlib", png_file(np.zeros((28, 28)), 8, 0, idat=b"\xff" * 100), "not valid zlib"),
    ("no IEND", png_file(np.zeros((28, 28)), 8, 0)[:-12], "ends before its IEND"),
    ("chunk past the end", png_file(np.zeros((28, 28)), 8, 0)[:-12] + struct.pack(">I", 1 << 30) + b"tEXt" + bytes(8),
     "declares 1073741824 bytes past the end"),
    ("too many chunks", png_file(np.zeros((28, 28)), 8, 0, extra=chunk(b"tEXt", b"a\x00b") * MAX_PNG_CHUNKS),
     f"more than {MAX_PNG_CHUNKS} chunks"),
    ("bad filter byte", png_file(np.zeros((28, 28)), 8, 0, idat=zlib.compress(b"\x09" * 812)), "cannot be decoded"),
    ("bad CRC", png_file(np.zeros((28, 28)), 8, 0)[:-13] + b"\x00" + png_file(np.zeros((28, 28)), 8, 0)[-12:],
     "'IDAT' chunk fails its CRC"),
]}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_pngs_are_refused_with_what_is_wrong(name):
    body, message = MALFORMED[name]
    with pytest.raises(ValueError, match=message):
        decode_png_body(body, (1, 28, 28))


class CountingZlib:
    """``zlib`` whose inflaters count the bytes they produce."""

    def __init__(self):
        self.inflated = 0

    def __getattr__(self, name):
        return getattr(zlib, name)

    def decompressobj(self, *args):
        inflater, counter = zlib.decompressobj(*args), self

        class Counting:
            def decompress(self, data, max_length=0):
                out = inflater.decompress(data, max_length)
                counter.inflated += len(out)
                return out

            def __getattr__(self, name):
                return getattr(inflater, name)

        return Counting()


def test_a_decompression_bomb_is_refused_after_inflating_one_byte_more_than_the_header_needs(monkeypatch):
    counting, decoded = CountingZlib(), []
    monkeypatch.setattr(png_module, "zlib", counting)
    monkeypatch.setattr(png_module.Image, "open", lambda *args, **kwargs: decoded.append(args))
    body = bomb(inflated_mib=4096)  # 4 MiB of PNG, 4 GiB of pixels
    with pytest.raises(ValueError, match="inflates past the 812 bytes its 28x28 header needs"):
        decode_png_body(body, (1, 28, 28))
    assert counting.inflated == 813 and decoded == []  # the decoder never saw it


def test_chunks_the_pixels_do_not_need_never_reach_the_decoder(monkeypatch):
    """A compressed text chunk inflating to 64 MiB (decoders inflate those too) is dropped unread."""
    text_bomb = chunk(b"zTXt", b"comment\x00\x00" + zlib.compress(bytes(64 << 20), 9))
    values = grey_values(8)
    seen = []
    real = png_module.Image.open
    monkeypatch.setattr(png_module.Image, "open", lambda file, **kwargs: seen.append(file.getvalue()) or real(file, **kwargs))
    x = decode_png_body(png_file(values, 8, 0, extra=text_bomb + chunk(b"gAMA", bytes(4))), (1, 28, 28))
    assert torch.equal(x[0, 0], torch.from_numpy(values).float() / 255)
    assert b"zTXt" not in seen[0] and b"gAMA" not in seen[0] and b"IDAT" in seen[0]


# ---------------------------------------------------------------------------------------------------------- the server
@pytest.fixture
def server(tmp_path, checkpoint_factory):
    torch.manual_seed(0)
    checkpoint = checkpoint_factory(EnsembleModule(num_members=3), "edm.ckpt")
    running = Server(checkpoint, tmp_path, {"alice": add_client(tmp_path / "clients.yaml", "alice", 1000)})
    running.start()
    yield running
    running.process.terminate()
    running.process.wait(timeout=30)


def test_the_api_answers_and_charges_pngs_by_their_own_bit_depth_and_refuses_a_bomb_cheaply(server):
    victim = VictimConfig(server.checkpoint, router="keyed", key=ROUTER_KEY).build().stack_members()  # as served
    values = grey_values(16)
    answer = server.post("alice", png_file(values, 16, 0), "image/png")
    assert answer.status_code == 200, answer.text
    expected = victim(torch.from_numpy(values).float().div(65535)[None, None])
    exact = {"rtol": 0, "atol": 1e-6}  # another process's float rounding; the decoding itself is tested bit for bit above
    torch.testing.assert_close(torch.tensor(answer.json()["probabilities"]), expected, **exact)
    one_bit = grey_values(1)
    answer = server.post("alice", png_file(one_bit, 1, 0), "image/png")
    torch.testing.assert_close(torch.tensor(answer.json()["probabilities"]),
                               victim(torch.from_numpy(one_bit).float()[None, None]), **exact)
    refused = server.post("alice", bomb(inflated_mib=900), "image/png")  # under the server's 1 MiB body limit
    assert refused.status_code == 400 and "inflates past the 812 bytes" in refused.json()["detail"]
    transparent = server.post("alice", png_file(np.full((28, 28, 2), 255), 8, 4), "image/png")
    assert transparent.status_code == 422 and "transparency" in transparent.json()["detail"]
    assert server.spent("alice") == 2  # the two answered images; refusals count nothing
    assert server.post("alice", png_file(grey_values(8), 8, 0), "image/png").status_code == 200


# ---------------------------------------------------------------------------------------------------------- clients
def add_one(path: str, name: str, start, keys) -> None:
    start.wait(timeout=60)
    keys.put((name, add_client(path, name, 10)))


def add_at_once(paths: list[str]) -> dict[str, str]:
    """``add-client`` in one forked process per path, all released together; every process must succeed.

    Returns:
        Client name -> the key its process printed.
    """
    context = multiprocessing.get_context("fork")
    start, keys = context.Barrier(len(paths)), context.Queue()
    workers = [context.Process(target=add_one, args=(path, f"client-{i}", start, keys)) for i, path in enumerate(paths)]
    for worker in workers:
        worker.start()
    printed = dict(keys.get(timeout=120) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    return printed


def test_add_client_run_16_times_at_once_adds_16_working_keys(tmp_path):
    """16 processes released together on one clients file: every printed key is in the file."""
    path = str(tmp_path / "clients.yaml")
    printed = add_at_once([path] * 16)
    clients = load_clients(path)
    assert len(printed) == len(clients) == 16
    assert all(clients[key_digest(key)].name == name for name, key in printed.items())


# ---------------------------------------------------------------------------------------------------------- router keys
@pytest.fixture
def no_key_env(monkeypatch):
    monkeypatch.delenv("EDM_ROUTER_KEY", raising=False)
    monkeypatch.delenv("EDM_ROUTER_KEY_FILE", raising=False)



def serve_with_key(how: str, key: str, router: str, folder: Path, checkpoint: str, monkeypatch) -> list[str]:
    """The server's command line with ``key`` given ``how`` (environment, key file or the server's config)."""
    if how == "environment":
        monkeypatch.setenv("EDM_ROUTER_KEY", key)
    elif how == "key file":
        (folder / "router.key").write_text(key + "\n")
        monkeypatch.setenv("EDM_ROUTER_KEY_FILE", str(folder / "router.key"))
    config = {"victim": {"checkpoint": checkpoint, "router": router, **({"key": key} if how == "config" else {})},
              "clients_file": str(folder / "clients.yaml"), "ledger": str(folder / "ledger.sqlite")}
    (folder / "serve.yaml").write_text(yaml.safe_dump(config))
    return ["--config", str(folder / "serve.yaml")]


@pytest.mark.parametrize("how", ["environment", "key file", "config"])
@pytest.mark.parametrize("key, message", [
    ("edm-lightning", "is the public default 'edm-lightning'"),
    (" EDM-Lightning ", "is the public default 'edm-lightning'"),
    ("0123456789abcde", "too short or too plain to be secret \\(15 bytes.*at least 16 bytes"),
    ("a" * 32, "too short or too plain to be secret"),
])
def test_the_server_refuses_a_router_key_anyone_can_compute_however_it_arrives(
        how, key, message, tmp_path, checkpoint_factory, capsys, monkeypatch, no_key_env):
    checkpoint = checkpoint_factory(EnsembleModule(num_members=3), "edm.ckpt")
    add_client(tmp_path / "clients.yaml", "alice", 10)
    for router in ("keyed", "coarse"):
        argv = serve_with_key(how, key, router, tmp_path, checkpoint, monkeypatch)
        with pytest.raises(SystemExit) as exit_info:
            serve_main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert re.search(message, err) and "secrets.token_hex(32)" in err, err
    assert not (tmp_path / "ledger.sqlite").exists()  # refused before anything was opened


@pytest.mark.parametrize("how", ["environment", "key file", "config"])
def test_the_server_takes_a_random_key_however_it_arrives(how, tmp_path, checkpoint_factory, monkeypatch, no_key_env):
    checkpoint = checkpoint_factory(EnsembleModule(num_members=3), "edm.ckpt")
    add_client(tmp_path / "clients.yaml", "alice", 10)
    serve_with_key(how, GOOD_KEY, "keyed", tmp_path, checkpoint, monkeypatch)
    config = ServeConfig(VictimConfig(checkpoint, router="keyed", key=GOOD_KEY if how == "config" else None),
                         clients_file=str(tmp_path / "clients.yaml"), ledger=str(tmp_path / "ledger.sqlite"))
    assert build_app(config) is not None


# ---------------------------------------------------------------------------------------------------------- ledger
def ledger_with(path: Path, *statements: str) -> Path:
    db = sqlite3.connect(path)
    for statement in statements:
        db.execute(statement)
    db.commit()
    db.close()
    return path


def damaged_ledgers(folder: Path) -> list[tuple[str, Path, str]]:
    good = folder / "good.sqlite"
    SqliteLedger(good).charge("alice", 5, 10)
    truncated = folder / "truncated.sqlite"
    truncated.write_bytes(good.read_bytes()[:700])
    garbage = folder / "garbage.sqlite"
    garbage.write_bytes(bytes(range(256)) * 64)
    (folder / "emptied.sqlite").write_bytes(b"")  # `> ledger.sqlite`
    spent = "CREATE TABLE spent (client TEXT PRIMARY KEY, queries INTEGER NOT NULL)"
    return [
        ("not a database", garbage, "file is not a database"),
        ("a text file", folder / "notes.txt", "file is not a database"),
        ("truncated", truncated, "not a readable query ledger"),
        ("an empty file", folder / "emptied.sqlite",
         "is an empty file: .*every client's spent queries would restart at 0: .*delete it to start a new ledger knowingly"),
        ("a database without tables", ledger_with(folder / "no-tables.sqlite", "PRAGMA user_version = 7"),
         "it holds no tables"),
        ("another schema", ledger_with(folder / "schema.sqlite", "CREATE TABLE spent (who TEXT, n REAL)"),
         "has the columns \\['who TEXT', 'n REAL'\\]"),
        ("another program's tables", ledger_with(folder / "other.sqlite", "CREATE TABLE users (id INTEGER)"),
         "holds the tables \\['users'\\]"),
        ("a negative count", ledger_with(folder / "negative.sqlite", spent, "INSERT INTO spent VALUES ('alice', -5000)"),
         "client 'alice' has spent -5000 queries"),
        ("a count in words", ledger_with(folder / "words.sqlite", spent, "INSERT INTO spent VALUES ('alice', 'many')"),
         "has spent 'many' queries"),
    ]


def test_a_damaged_ledger_is_refused_with_one_line_and_exit_2_before_serving(tmp_path, checkpoint_factory, capsys):
    checkpoint = checkpoint_factory(EnsembleModule(num_members=3), "edm.ckpt")
    add_client(tmp_path / "clients.yaml", "alice", 10)
    (tmp_path / "notes.txt").write_text("these are not queries\n" * 100)
    for name, ledger, message in damaged_ledgers(tmp_path):
        before = ledger.read_bytes() if ledger.is_file() else None
        with pytest.raises(SystemExit) as exit_info:
            serve_main(["--victim.checkpoint", checkpoint, "--clients_file", str(tmp_path / "clients.yaml"),
                        "--ledger", str(ledger)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (name, err)
        assert re.search(message, err) and "restore it from a backup" in err, (name, err)
        assert before is None or ledger.read_bytes() == before, name  # refused without writing to it
    with pytest.raises(ConfigError, match="not a readable query ledger"):
        SqliteLedger(tmp_path / "garbage.sqlite")
    assert SqliteLedger(tmp_path / "good.sqlite").spent("alice") == 5  # a sound ledger still opens and counts


def test_other_start_up_problems_end_in_one_line_and_exit_2(tmp_path, checkpoint_factory, capsys):
    checkpoint = checkpoint_factory(EnsembleModule(num_members=3), "edm.ckpt")
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)))
    add_client(tmp_path / "clients.yaml", "alice", 10)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        for options, message in (
            (["--clients_file", str(tmp_path / "binary.yaml")], "is not readable YAML"),
            (["--clients_file", str(tmp_path / "clients.yaml"), "--port", str(port)], f"cannot listen on 127.0.0.1:{port}"),
        ):
            with pytest.raises(SystemExit) as exit_info:
                serve_main(["--victim.checkpoint", checkpoint, "--ledger", str(tmp_path / "ledger.sqlite"), *options])
            err = capsys.readouterr().err
            assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    serve_main(["--victim.checkpoint", checkpoint, "--clients_file", str(tmp_path / "clients.yaml"),
                "--ledger", str(tmp_path / "ledger.sqlite"), "--port", str(port)])  # free again: it would serve
    assert "LISTENING" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------- help
def test_serve_help_names_the_command_as_called_and_tells_how_to_add_a_client(capsys, monkeypatch):
    for prog in ("python -m edm_lightning.serve", "edm-lightning serve"):
        with pytest.raises(SystemExit) as exit_info:
            serve_main(["--help"], prog=prog)
        out = capsys.readouterr().out
        assert exit_info.value.code == 0 and out.startswith(f"usage: {prog} ")
        assert f"{prog} add-client --file clients.yaml" in " ".join(out.split())
        with pytest.raises(SystemExit):
            serve_main(["add-client", "--help"], prog=prog)
        assert capsys.readouterr().out.startswith(f"usage: {prog} add-client ")
    monkeypatch.setattr(sys, "argv", ["edm-lightning", "serve", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        dispatcher.main()
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith("usage: edm-lightning serve ") and "add-client" in out



# ---------------------------------------------------------------------------------------------------------- links, empty files
def test_add_client_through_a_link_and_through_its_file_at_once_adds_every_key(tmp_path):
    """8 processes name the clients file by a link, 8 by its own name: one file, one lock, 16 keys, the link kept."""
    (tmp_path / "real").mkdir()
    real, link = tmp_path / "real" / "clients.yaml", tmp_path / "link.yaml"
    link.symlink_to(Path("real") / "clients.yaml")  # relative, as `ln -s real/clients.yaml link.yaml` makes it
    printed = add_at_once([str(link if i % 2 else real) for i in range(16)])
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert not (tmp_path / "link.yaml.lock").exists()  # the lock is the real file's
    for file in (link, real):
        clients = load_clients(file)
        assert len(printed) == len(clients) == 16
        assert all(clients[key_digest(key)].name == name for name, key in printed.items())


def test_a_linked_ledger_is_the_file_it_points_to_and_a_link_to_nothing_is_refused(tmp_path):
    link, real = tmp_path / "ledger.sqlite", tmp_path / "state" / "ledger.sqlite"
    link.symlink_to(real)
    with pytest.raises(ConfigError, match="is a link to .*which does not exist: .*restart every client's spent queries"):
        SqliteLedger(link)  # its file lost (or its volume not mounted): not a new ledger
    assert not real.parent.exists()
    SqliteLedger(real).charge("alice", 3, 10)
    assert SqliteLedger(link).charge("alice", 4, 10) == 7 and SqliteLedger(real).spent("alice") == 7
    assert link.is_symlink() and sorted(path.name for path in tmp_path.iterdir()) == ["ledger.sqlite", "state"]
    assert sorted(path.name for path in real.parent.iterdir()) == ["ledger.sqlite"]  # no temporary file left


def open_and_charge(path: str, start, done) -> None:
    start.wait(timeout=60)
    SqliteLedger(path).charge("alice", 1, 100)
    done.put(True)


def test_servers_starting_together_on_a_new_ledger_all_open_it_and_none_finds_it_empty(tmp_path):
    """Only a path where nothing is makes a new ledger, and it appears whole: 8 openers racing each count once."""
    path = str(tmp_path / "new" / "ledger.sqlite")
    context = multiprocessing.get_context("fork")
    start, done = context.Barrier(8), context.Queue()
    workers = [context.Process(target=open_and_charge, args=(path, start, done)) for _ in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    assert SqliteLedger(path).spent("alice") == 8
    assert [p.name for p in (tmp_path / "new").iterdir() if p.name.endswith(".tmp")] == []


# ---------------------------------------------------------------------------------------------------------- key files
@pytest.mark.parametrize("how", ["environment", "key file", "config"])
@pytest.mark.parametrize("key, message", [
    ("\ufeffedm-lightning", "is the public default 'edm-lightning'"),  # an editor's byte-order mark before it
    ("\ufeff EDM-Lightning\r", "is the public default 'edm-lightning'"),
    ("\ufeff0123456789abc", "too short or too plain to be secret \\(13 bytes"),  # 16 bytes with the mark
])
def test_a_byte_order_mark_does_not_make_a_public_key_secret(how, key, message, tmp_path, checkpoint_factory, capsys,
                                                             monkeypatch, no_key_env):
    checkpoint = checkpoint_factory(EnsembleModule(num_members=3), "edm.ckpt")
    add_client(tmp_path / "clients.yaml", "alice", 10)
    with pytest.raises(SystemExit) as exit_info:
        serve_main(serve_with_key(how, key, "keyed", tmp_path, checkpoint, monkeypatch))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and re.search(message, err), err


def test_a_key_file_saved_with_a_byte_order_mark_serves_the_key_it_reads_as(tmp_path, checkpoint_factory, monkeypatch,
                                                                           no_key_env):
    checkpoint = checkpoint_factory(EnsembleModule(num_members=3), "edm.ckpt")
    (tmp_path / "router.key").write_bytes(b"\xef\xbb\xbf" + GOOD_KEY.encode() + b"\r\n")
    monkeypatch.setenv("EDM_ROUTER_KEY_FILE", str(tmp_path / "router.key"))
    from_file = VictimConfig(checkpoint, router="keyed").build()
    typed = VictimConfig(checkpoint, router="keyed", key=GOOD_KEY).build()
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert torch.equal(from_file(x), typed(x))


def test_a_key_of_random_bytes_in_the_environment_is_used_as_it_is(monkeypatch, no_key_env):
    raw = bytes(range(200, 232))  # not UTF-8: the environment holds it as the bytes it is
    monkeypatch.setenv("EDM_ROUTER_KEY", os.fsdecode(raw))
    assert resolve_router_key(require_secret=True) == raw


# ---------------------------------------------------------------------------------------------------------- wording
def test_start_up_messages_say_what_is_wrong(tmp_path, checkpoint_factory, capsys, monkeypatch):
    checkpoint = checkpoint_factory(EnsembleModule(num_members=3), "edm.ckpt")
    add_client(tmp_path / "clients.yaml", "alice", 10)
    (tmp_path / "a-folder").mkdir()
    whole = Path(checkpoint).read_bytes()
    for cut in (0, 100, 40_000, len(whole) // 2):  # EOFError, RuntimeError, OSError [Errno 22] from torch
        (tmp_path / f"cut-{cut}.ckpt").write_bytes(whole[:cut])

    def unresolvable(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    cases = [
        (["--clients_file", str(tmp_path / "a-folder")], "'.*a-folder' is a folder, not a clients file", "does not exist"),
        (["--ledger", str(tmp_path / "a-folder")], "'.*a-folder' is a folder, not a ledger file", "restore it"),
        (["--host", "192.0.2.1"], "cannot listen on 192.0.2.1:.*the host '192.0.2.1' cannot be bound here", "--port"),
        (["--host", "no-such-host.invalid"], "cannot resolve the host 'no-such-host.invalid'", "--port"),
        *((["--victim.checkpoint", str(tmp_path / f"cut-{cut}.ckpt")],
           f"Victim checkpoint '.*cut-{cut}.ckpt' is not a readable Lightning checkpoint: it is cut short or damaged "
           ".*restore it from a backup, or train it again", "Traceback") for cut in (0, 100, 40_000, len(whole) // 2)),
    ]
    for options, message, absent in cases:
        with monkeypatch.context() as patch:
            if "no-such-host.invalid" in options:
                patch.setattr(socket, "getaddrinfo", unresolvable)  # no name server asked
            with pytest.raises(SystemExit) as exit_info:
                serve_main(["--victim.checkpoint", checkpoint, "--clients_file", str(tmp_path / "clients.yaml"),
                            "--ledger", str(tmp_path / "ledger.sqlite"), *options])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, (options, err)
        assert re.search(message, err) and absent not in err, (options, err)


def test_add_client_says_a_running_server_takes_the_key_within_a_second(tmp_path, capsys):
    serve_main(["add-client", "--file", str(tmp_path / "clients.yaml"), "--name", "alice", "--budget", "10"])
    captured = capsys.readouterr()
    assert "a running server on this file takes it within a second" in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    key = captured.out.strip()
    assert load_clients(tmp_path / "clients.yaml")[key_digest(key)].name == "alice"
