"""LeRobot datasets: what `write_lerobot_dataset` writes, `LeRobotSource` reads back (v2.1 and v3.0, images as PNG
in parquet or as video), with random access, key maps, rotation and one-line errors."""

from __future__ import annotations

import json
import pickle
import weakref
from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest

from pi0_lightning.data import lerobot_writer
from pi0_lightning.data.lerobot import LeRobotSource
from pi0_lightning.data.lerobot_writer import DemoEpisode, EpisodeSpool, write_lerobot_dataset
from pi0_lightning.data.source import DatasetError, KeyMap

TASKS = ("put the bowl on the plate", "open the top drawer")
LENGTHS = (6, 9, 7)
VIDEO_MAE = 8.0
"""Mean absolute error (of 255) allowed between a written and a decoded video frame: yuv420p video is lossy."""
COMBINATIONS = [("v2.1", "image"), ("v2.1", "video"), ("v3.0", "image"), ("v3.0", "video")]
TOP, WRIST, STATE, ACTION = "observation.images.top", "observation.images.wrist", "observation.state", "action"
FIELDS = ("images", "wrist_images", "state", "actions")


def make_episodes(lengths: tuple[int, ...] = LENGTHS, size: int = 32) -> list[DemoEpisode]:
    """Smooth gradients (video keeps them well) whose colours move with the frame and the episode."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    episodes = []
    for e, length in enumerate(lengths):
        rng = np.random.default_rng(e)
        images, wrists = [], []
        for t in range(length):
            # channels stay within 0..255 for up to 12 frames; neighbouring frames differ by 11 on average
            base = np.stack([x * 80 + 10 * t + 20 * e, y * 100 + 8 * t, np.full_like(x, 40 + 15 * t)], -1)
            images.append(base.astype(np.uint8))
            wrists.append((230 - base[:, ::-1] * 0.8).astype(np.uint8))
        state = rng.standard_normal((length, 8)).astype(np.float32)
        actions = rng.standard_normal((length, 7)).astype(np.float32)
        episodes.append(DemoEpisode(np.stack(images), np.stack(wrists), state, actions, TASKS[e % 2]))
    return episodes


EPISODES = make_episodes()


@pytest.fixture(scope="module", params=COMBINATIONS, ids=[f"{v}-{s}" for v, s in COMBINATIONS])
def written(request, tmp_path_factory) -> tuple[Path, str, str]:
    version, storage = request.param
    root = tmp_path_factory.mktemp("lerobot") / f"{version}-{storage}"
    # two episodes per chunk (v2.1) or per file (v3.0): episode 2 lands in the next chunk or file
    write_lerobot_dataset(root, EPISODES, version=version, image_storage=storage, chunks_size=2, episodes_per_file=2)
    return root, version, storage


def mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def check_frame(got: np.ndarray, written: np.ndarray, episode_frames: np.ndarray, frame: int, exact: bool) -> None:
    assert got.dtype == np.uint8 and got.shape == written.shape and got.flags.c_contiguous
    if exact:
        np.testing.assert_array_equal(got, written)
    else:
        assert mae(got, written) < VIDEO_MAE
        # the nearest of all the episode's frames is this one: random access picked the right frame
        assert int(np.argmin([mae(got, other) for other in episode_frames])) == frame


def test_reads_back_what_was_written(written):
    root, version, storage = written
    source = LeRobotSource(root)
    assert source.version == version
    assert [(e.index, e.length, e.task) for e in source.episodes] == [
        (i, n, TASKS[i % 2]) for i, n in enumerate(LENGTHS)
    ]
    for e in (2, 0, 1):
        state, actions = source.columns(e)
        assert state.dtype == actions.dtype == np.float32
        np.testing.assert_array_equal(state, EPISODES[e].state)
        np.testing.assert_array_equal(actions, EPISODES[e].actions)
    # every frame once, shuffled across episodes: random access out of order and from file to file
    order = [(e, t) for e, n in enumerate(LENGTHS) for t in range(n)]
    for i in np.random.default_rng(0).permutation(len(order)):
        e, t = order[i]
        image, wrist = source.frame_images(e, t)
        check_frame(image, EPISODES[e].images[t], EPISODES[e].images, t, exact=storage == "image")
        check_frame(wrist, EPISODES[e].wrist_images[t], EPISODES[e].wrist_images, t, exact=storage == "image")
    # a worker gets a copy that reopens its files; consecutive frames then read forward
    copy = pickle.loads(pickle.dumps(source))
    assert copy.episodes == source.episodes
    for t in range(LENGTHS[1]):
        check_frame(copy.frame_images(1, t)[0], EPISODES[1].images[t], EPISODES[1].images, t, storage == "image")
    image, _ = copy.frame_images(1, 3)
    image[:] = 0  # the caller owns what it gets: the next read of the same frame is intact
    check_frame(copy.frame_images(1, 3)[0], EPISODES[1].images[3], EPISODES[1].images, 3, storage == "image")
    with pytest.raises(IndexError):
        source.frame_images(0, LENGTHS[0])


def test_layout_follows_lerobot(written):
    root, version, storage = written
    info = json.loads((root / "meta/info.json").read_text())
    assert info["codebase_version"] == version and info["fps"] == 10 and info["robot_type"] == "panda"
    assert (info["total_episodes"], info["total_frames"], info["total_tasks"]) == (3, sum(LENGTHS), 2)
    assert info["splits"] == {"train": "0:3"}
    assert info["features"]["image"]["dtype"] == storage and info["features"]["image"]["shape"] == [32, 32, 3]
    assert info["features"]["state"]["shape"] == [8] and info["features"]["actions"]["shape"] == [7]
    assert {"timestamp", "frame_index", "episode_index", "index", "task_index"} <= set(info["features"])
    if version == "v2.1":
        assert info["data_path"] == "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
        data = [root / "data/chunk-000/episode_000000.parquet", root / "data/chunk-001/episode_000002.parquet"]
        videos = [root / "videos/chunk-001/wrist_image/episode_000002.mp4"]
        lines = (root / "meta/episodes.jsonl").read_text().splitlines()
        assert json.loads(lines[1]) == {"episode_index": 1, "tasks": [TASKS[1]], "length": LENGTHS[1]}
        assert (root / "meta/tasks.jsonl").is_file() and (root / "meta/episodes_stats.jsonl").is_file()
    else:
        assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
        data = [root / "data/chunk-000/file-000.parquet", root / "data/chunk-000/file-001.parquet"]
        videos = [root / "videos/wrist_image/chunk-000/file-001.mp4"]
        rows = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
        assert [(r["dataset_from_index"], r["dataset_to_index"]) for r in rows] == [(0, 6), (6, 15), (15, 22)]
        if storage == "video":
            assert [r["videos/image/from_timestamp"] for r in rows] == pytest.approx([0.0, 0.6, 0.0])
        tasks = pq.read_table(root / "meta/tasks.parquet").to_pydict()
        assert dict(zip(tasks["task_index"], tasks["task"], strict=True)) == dict(enumerate(TASKS))
    assert all(path.is_file() for path in data)
    assert all(path.is_file() for path in videos) == (storage == "video")
    columns = set(pq.read_schema(data[0]).names)
    assert {"state", "actions", "timestamp", "frame_index", "episode_index", "index", "task_index"} <= columns
    assert ("image" in columns) == (storage == "image")
    assert not list(root.parent.glob(".*tmp*"))  # the temporary directory was renamed into place


def test_key_map_and_h264_with_b_frames(tmp_path):
    keys = KeyMap(image=TOP, wrist_image=WRIST, state=STATE, actions=ACTION)
    episodes = make_episodes((8, 12), size=48)
    root = write_lerobot_dataset(tmp_path / "ds", episodes, keys=keys, video_codec="libx264", video_gop=5)
    features = json.loads((root / "meta/info.json").read_text())["features"]
    assert {TOP, WRIST, STATE, ACTION} <= set(features) and features[TOP]["info"]["video.codec"] == "h264"
    source = LeRobotSource(root, keys)
    np.testing.assert_array_equal(source.columns(1)[1], episodes[1].actions)
    # frames far from keyframes, backwards, and across the episode boundary inside one video file
    for e, t in [(1, 11), (0, 3), (1, 0), (0, 7), (1, 6), (1, 7), (0, 0)]:
        image, wrist = source.frame_images(e, t)
        check_frame(image, episodes[e].images[t], episodes[e].images, t, exact=False)
        check_frame(wrist, episodes[e].wrist_images[t], episodes[e].wrist_images, t, exact=False)
    message = expect_error(r"KeyMap.image = 'image' is not a feature \(available: action, ", LeRobotSource, root)
    assert str(root / "meta/info.json") in message and "observation.images.top" in message


def test_v30_video_made_by_concatenating_episode_files(tmp_path):
    """LeRobot builds a v3.0 video file by remuxing per-episode files back to back (FFmpeg's concat demuxer); the
    episodes then start at from_timestamp = the sum of the earlier episodes' durations."""
    per_episode = write_lerobot_dataset(tmp_path / "v2", EPISODES, version="v2.1", image_storage="video")
    root = write_lerobot_dataset(tmp_path / "v3", EPISODES, version="v3.0", image_storage="video")
    for key in ("image", "wrist_image"):
        listing = tmp_path / f"{key}.ffconcat"
        parts = [per_episode / f"videos/chunk-000/{key}/episode_{e:06d}.mp4" for e in range(len(EPISODES))]
        listing.write_text("ffconcat version 1.0\n" + "".join(f"file '{part}'\n" for part in parts))
        target = root / f"videos/{key}/chunk-000/file-000.mp4"
        with av.open(str(listing), format="concat", options={"safe": "0"}) as src, av.open(str(target), "w") as dst:
            stream = dst.add_stream_from_template(src.streams.video[0], opaque=True)
            stream.time_base = src.streams.video[0].time_base
            for packet in src.demux(src.streams.video[0]):
                if packet.dts is not None:
                    packet.stream = stream
                    dst.mux(packet)
    source = LeRobotSource(root)
    for e, t in [(2, 6), (1, 0), (2, 0), (0, 5), (1, 8), (0, 0), (1, 4)]:
        image, wrist = source.frame_images(e, t)
        check_frame(image, EPISODES[e].images[t], EPISODES[e].images, t, exact=False)
        check_frame(wrist, EPISODES[e].wrist_images[t], EPISODES[e].wrist_images, t, exact=False)


def test_dict_episodes_and_rotate_180(tmp_path):
    episodes = [vars(episode) for episode in EPISODES[:2]]
    root = write_lerobot_dataset(tmp_path / "ds", episodes, version="v3.0", image_storage="image")
    source = LeRobotSource(root, rotate_180=True)
    image, wrist = source.frame_images(1, 4)
    np.testing.assert_array_equal(image, EPISODES[1].images[4][::-1, ::-1])
    np.testing.assert_array_equal(wrist, EPISODES[1].wrist_images[4][::-1, ::-1])
    assert image.flags.c_contiguous


def expect_error(match: str, call, *args, **kwargs) -> str:
    with pytest.raises(DatasetError, match=match) as error:
        call(*args, **kwargs)
    message = str(error.value)
    assert "\n" not in message
    return message


def edit_info(root: Path, edit) -> None:
    path = root / "meta/info.json"
    info = json.loads(path.read_text())
    edit(info)
    path.write_text(json.dumps(info))


@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
def test_errors_are_one_line_and_name_the_file(tmp_path, version):
    root = write_lerobot_dataset(tmp_path / "ds", EPISODES, version=version, image_storage="image")
    info_path = root / "meta/info.json"
    expect_error(r"already exists", write_lerobot_dataset, root, EPISODES, version=version)
    expect_error(r"dataset root does not exist", LeRobotSource, tmp_path / "nothing")

    edit_info(root, lambda info: info["features"]["state"].update(shape=[2, 4]))
    assert str(info_path) in expect_error(r"'state' must be a 1-d vector, has shape \[2, 4\]", LeRobotSource, root)
    edit_info(root, lambda info: info["features"]["state"].update(shape=[8]))
    edit_info(root, lambda info: info.update(codebase_version="v1.6"))
    expect_error(r"codebase_version 'v1.6' is not supported", LeRobotSource, root)
    edit_info(root, lambda info: info.update(codebase_version=version))
    expect_error(
        r"KeyMap.state = 'qpos' is not a feature \(available: actions, ", LeRobotSource, root, KeyMap(state="qpos")
    )


def test_truncated_episode_parquet(tmp_path):
    for version, data, episode in [
        ("v2.1", "data/chunk-000/episode_000001.parquet", 1),
        ("v3.0", "data/chunk-000/file-000.parquet", 2),
    ]:
        root = write_lerobot_dataset(tmp_path / version, EPISODES, version=version, image_storage="image")
        table = pq.read_table(root / data)
        pq.write_table(table.slice(0, len(table) - 2), root / data)
        source = LeRobotSource(root)
        np.testing.assert_array_equal(source.columns(0)[0], EPISODES[0].state)  # the untouched episode still reads
        length = LENGTHS[episode]
        cause = rf"episode {episode} has {length - 2} rows but its metadata says length {length}"
        assert str(root / data) in expect_error(cause, source.columns, episode)
        expect_error(cause, source.frame_images, episode, 0)


def test_missing_files(tmp_path):
    root = write_lerobot_dataset(tmp_path / "ds", EPISODES, version="v2.1", image_storage="video")
    (root / "videos/chunk-000/wrist_image/episode_000001.mp4").unlink()
    (root / "data/chunk-000/episode_000002.parquet").unlink()
    source = LeRobotSource(root)
    source.frame_images(0, 0)
    expect_error(r"episode_000001.mp4: video file missing", source.frame_images, 1, 0)
    expect_error(r"episode_000002.parquet: parquet file missing", source.columns, 2)
    (root / "meta/info.json").unlink()
    expect_error(r"meta/info.json: missing \(not a LeRobot dataset root\)", LeRobotSource, root)


def test_prompt_from_task_index_when_episodes_list_no_tasks(tmp_path):
    v21 = write_lerobot_dataset(tmp_path / "v2", EPISODES, version="v2.1", image_storage="image")
    lines = [json.loads(line) for line in (v21 / "meta/episodes.jsonl").read_text().splitlines()]
    (v21 / "meta/episodes.jsonl").write_text("".join(json.dumps({**line, "tasks": []}) + "\n" for line in lines))
    v30 = write_lerobot_dataset(tmp_path / "v3", EPISODES, version="v3.0", image_storage="image")
    path = v30 / "meta/episodes/chunk-000/file-000.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["tasks"]), path)
    for root in (v21, v30):
        assert [e.task for e in LeRobotSource(root).episodes] == [TASKS[0], TASKS[1], TASKS[0]]


def test_writer_refuses_bad_input_and_leaves_nothing(tmp_path, monkeypatch):
    bad = DemoEpisode(EPISODES[0].images[:3], EPISODES[0].wrist_images, EPISODES[0].state, EPISODES[0].actions, "t")
    expect_error(r"episode 0 has 3 steps of image, 6 of state", write_lerobot_dataset, tmp_path / "ds", [bad])
    expect_error(
        r"video encoder 'no-such-codec' is not available",
        write_lerobot_dataset,
        tmp_path / "ds",
        EPISODES,
        video_codec="no-such-codec",
    )

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(lerobot_writer, "_write_tasks_parquet", fail)  # after the data and video files
    with pytest.raises(OSError, match="disk full"):
        write_lerobot_dataset(tmp_path / "ds", EPISODES, version="v3.0", image_storage="video")
    assert list(tmp_path.iterdir()) == []  # neither the dataset nor its temporary directory


def random_episodes(lengths: tuple[int, ...]) -> list[DemoEpisode]:
    """Noise images of two sizes; states far from zero (a naive E[x^2] - E[x]^2 loses their std), small actions."""
    rng = np.random.default_rng(7)
    return [
        DemoEpisode(
            rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
            rng.integers(30 + e, 200, (n, 6, 4, 3), dtype=np.uint8),
            (1000 + rng.standard_normal((n, 3)) * (e + 1)).astype(np.float32),
            (rng.standard_normal((n, 2)) * 1e-3).astype(np.float32),
            TASKS[e % 2],
        )
        for e, n in enumerate(lengths)
    ]


def numpy_stats(episodes: list[DemoEpisode], first_episode: int, first_row: int) -> dict[str, dict[str, np.ndarray]]:
    """The statistics over the concatenated frames, computed at once (the tasks are indexed TASKS[e % 2])."""
    lengths = [len(episode.state) for episode in episodes]
    numbers = range(first_episode, first_episode + len(episodes))
    columns = {
        "state": np.concatenate([episode.state for episode in episodes]),
        "actions": np.concatenate([episode.actions for episode in episodes]),
        "timestamp": np.concatenate([np.arange(n) / 10 for n in lengths])[:, None],
        "frame_index": np.concatenate([np.arange(n) for n in lengths])[:, None],
        "episode_index": np.repeat(numbers, lengths)[:, None],
        "index": np.arange(first_row, first_row + sum(lengths))[:, None],
        "task_index": np.repeat([e % 2 for e in numbers], lengths)[:, None],
        "image": np.concatenate([episode.images for episode in episodes]).reshape(-1, 3) / 255.0,
        "wrist_image": np.concatenate([episode.wrist_images for episode in episodes]).reshape(-1, 3) / 255.0,
    }
    stats = {}
    for key, values in columns.items():
        values = values.astype(np.float64)
        shape = (3, 1, 1) if key in ("image", "wrist_image") else values.shape[1:]
        stats[key] = {name: getattr(np, name)(values, 0).reshape(shape) for name in ("min", "max", "mean", "std")}
        stats[key]["count"] = sum(lengths)  # frames, also for the cameras
    return stats


def check_stats(got: dict, expected: dict[str, dict[str, np.ndarray]]) -> None:
    assert list(got) == list(expected)  # the JSON layout: features in this order
    for key, stats in expected.items():
        assert list(got[key]) == ["min", "max", "mean", "std", "count"] and got[key]["count"] == [stats["count"]]
        for name in ("min", "max", "mean", "std"):
            value = np.array(got[key][name])
            assert value.shape == stats[name].shape, (key, name)
            np.testing.assert_allclose(value, stats[name], rtol=1e-9, atol=1e-300, err_msg=f"{key} {name}")


@pytest.mark.parametrize("version, episodes_per_file", [("v2.1", None), ("v3.0", None), ("v3.0", 2)])
def test_statistics_equal_numpy_over_all_frames(tmp_path, version, episodes_per_file):
    lengths = (5, 3, 8, 1, 6)
    episodes = random_episodes(lengths)
    root = write_lerobot_dataset(
        tmp_path / "ds", episodes, version=version, image_storage="image", episodes_per_file=episodes_per_file
    )
    if version == "v2.1":
        lines = [json.loads(line) for line in (root / "meta/episodes_stats.jsonl").read_text().splitlines()]
        assert [line["episode_index"] for line in lines] == list(range(len(lengths)))
        for e, line in enumerate(lines):
            check_stats(line["stats"], numpy_stats(episodes[e : e + 1], e, sum(lengths[:e])))
    else:
        check_stats(json.loads((root / "meta/stats.json").read_text()), numpy_stats(episodes, 0, 0))


class CountingEpisodes:
    """A lazy sequence (only len and indexing) returning fresh arrays on every access, which counts the loads and how
    many loaded episodes are alive at once: an episode is alive while any of its arrays is."""

    def __init__(self, episodes: list[DemoEpisode]):
        self.episodes = episodes
        self.loads = self.alive = self.peak = 0

    def __len__(self) -> int:
        return len(self.episodes)

    def __getitem__(self, index: int) -> DemoEpisode:
        source = self.episodes[index]
        arrays = [np.array(getattr(source, field)) for field in FIELDS]
        self.loads += 1
        self.alive += 1
        self.peak = max(self.peak, self.alive)
        remaining = [len(arrays)]

        def release() -> None:
            remaining[0] -= 1
            if remaining[0] == 0:
                self.alive -= 1

        for array in arrays:
            weakref.finalize(array, release)
        return DemoEpisode(*arrays, task=source.task)


@pytest.mark.parametrize("version, storage", [("v3.0", "video"), ("v3.0", "image"), ("v2.1", "video")])
def test_writer_holds_one_episode_at_a_time(tmp_path, version, storage):
    episodes = make_episodes((4, 6, 3, 5, 4, 2), size=16)
    counting = CountingEpisodes(episodes)
    root = write_lerobot_dataset(tmp_path / "ds", counting, version=version, image_storage=storage)
    # all six in one data and video file (v3.0's default), yet never more than two episodes in memory
    assert counting.peak <= 2 and counting.alive == 0
    assert counting.loads == 2 * len(episodes)  # checked once, written once; the metadata reloads none
    source = LeRobotSource(root)
    assert [e.length for e in source.episodes] == [4, 6, 3, 5, 4, 2]
    for e, episode in enumerate(episodes):
        np.testing.assert_array_equal(source.columns(e)[0], episode.state)
        check_frame(source.frame_images(e, 1)[0], episode.images[1], episode.images, 1, exact=storage == "image")
    if version == "v3.0":
        assert sorted(p.name for p in (root / "data/chunk-000").iterdir()) == ["file-000.parquet"]
        assert pq.ParquetFile(root / "data/chunk-000/file-000.parquet").metadata.num_row_groups == len(episodes)


def test_episode_spool_round_trip_and_dataset(tmp_path):
    directory = tmp_path / "spool"
    with EpisodeSpool(directory) as spool:
        assert isinstance(spool, Sequence) and len(spool) == 0 and directory.is_dir()
        spool.append(EPISODES[0])
        spool.append(vars(EPISODES[1]))  # a dict of the fields is fine too
        spool.append(EPISODES[2])
        assert len(spool) == 3
        assert sorted(p.name for p in directory.iterdir()) == [f"episode_{e:06d}.npz" for e in range(3)]
        for e in (2, 0, 1, -1):
            got, want = spool[e], EPISODES[e]
            assert got.task == want.task and isinstance(got.task, str)
            for field in FIELDS:
                np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
                assert getattr(got, field).dtype == getattr(want, field).dtype
        with pytest.raises(IndexError):
            spool[3]
        root = write_lerobot_dataset(tmp_path / "ds", spool, version="v3.0", image_storage="image")
        assert len(spool) == 3 and directory.is_dir()  # writing reads the spool, leaves it as it is
    assert not directory.exists()
    expect_error(r"episode spool is closed", spool.__getitem__, 0)
    expect_error(r"episode spool is closed", spool.append, EPISODES[0])

    source = LeRobotSource(root)
    assert [(e.index, e.length, e.task) for e in source.episodes] == [
        (i, n, TASKS[i % 2]) for i, n in enumerate(LENGTHS)
    ]
    for e, episode in enumerate(EPISODES):
        state, actions = source.columns(e)
        np.testing.assert_array_equal(state, episode.state)
        np.testing.assert_array_equal(actions, episode.actions)
        for t in range(LENGTHS[e]):
            image, wrist = source.frame_images(e, t)
            np.testing.assert_array_equal(image, episode.images[t])
            np.testing.assert_array_equal(wrist, episode.wrist_images[t])


def test_episode_spool_refuses_a_used_directory(tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    expect_error(r"busy: exists and is not an empty directory", EpisodeSpool, busy)
    assert (busy / "keep.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    spool = EpisodeSpool(empty)  # an empty directory, e.g. from tempfile.mkdtemp, is taken over
    spool.append(EPISODES[1])
    assert spool[0].task == TASKS[1]
    spool.close()
    assert not empty.exists()
