"""ChatML rendering: golden strings written from the released chat template, placeholder expansion, labels."""

import numpy as np
import pytest

from omni_jax.batch import IGNORE
from omni_jax.config import TokenIds
from omni_jax.input import chat
from omni_jax.input.chat import AudioItem, ChatError, ChatFormat, ImageItem, VideoItem
from omni_jax.input.tokenizer import SPECIAL_TOKENS, Tokenizer
from omni_jax.positions import audio_in_video_layout

IM_START, IM_END, NL = 151644, 151645, 198
A_BOS, AUDIO, A_EOS, V_BOS, V_EOS, IMAGE, VIDEO = 151647, 151646, 151648, 151652, 151653, 151655, 151656


@pytest.fixture(scope="module")
def tok():
  return Tokenizer()


@pytest.fixture(scope="module")
def fmt():
  return ChatFormat(special=SPECIAL_TOKENS)


def user(*parts):
  return {"role": "user", "content": list(parts)}


def text(t):
  return {"type": "text", "text": t}


def test_golden_text_only(fmt):
  msgs = chat.with_system([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])
  assert chat.render_text(msgs, fmt) == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                                         "<|im_start|>user\nHi<|im_end|>\n"
                                         "<|im_start|>assistant\nHello!<|im_end|>\n")


def test_golden_speech_system_prompt_and_generation_prompt(fmt):
  msgs = chat.with_system([user(text("Say hi."))], speech_output=True)
  assert chat.render_text(msgs, fmt, add_generation_prompt=True) == (
      "<|im_start|>system\nYou are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of "
      "perceiving auditory and visual inputs, as well as generating text and speech.<|im_end|>\n"
      "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n")


def test_golden_given_system_is_kept(fmt):
  msgs = chat.with_system([{"role": "system", "content": "Be brief."}, user(text("?"))], speech_output=True)
  assert chat.render_text(msgs, fmt).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")


def test_golden_media_placeholders(fmt):
  msgs = chat.with_system([user({"type": "image"}, {"type": "audio"}, text("Compare."), {"type": "video"})])
  assert chat.render_text(msgs, fmt) == (
      "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
      "<|vision_bos|><|IMAGE|><|vision_eos|><|audio_bos|><|AUDIO|><|audio_eos|>Compare."
      "<|vision_bos|><|VIDEO|><|vision_eos|><|im_end|>\n")
  ids_fmt = ChatFormat(special=SPECIAL_TOKENS, add_vision_id=True, add_audio_id=True)
  msgs = [user({"type": "image"}, {"type": "image"}, {"type": "audio"}, {"type": "video"})]
  assert chat.render_text(msgs, ids_fmt) == (
      "<|im_start|>user\nPicture 1: <|vision_bos|><|IMAGE|><|vision_eos|>Picture 2: <|vision_bos|><|IMAGE|>"
      "<|vision_eos|>Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>Video 1: <|vision_bos|><|VIDEO|><|vision_eos|>"
      "<|im_end|>\n")


def test_ids_follow_the_spec_layout(tok, fmt):
  msgs = chat.with_system([user({"type": "audio"}, text("What is it?")), {"role": "assistant", "content": "A bell."}])
  out = chat.render(msgs, [AudioItem(100)], tok, fmt)
  sys_ids = tok.encode("You are a helpful assistant.")
  expected = ([IM_START, 8948, NL] + sys_ids + [IM_END, NL, IM_START, 872, NL, A_BOS] + [AUDIO] * 25 + [A_EOS]
              + tok.encode("What is it?") + [IM_END, NL, IM_START, 77091, NL] + tok.encode("A bell.") + [IM_END, NL])
  assert out.input_ids.tolist() == expected
  assert out.input_ids.dtype == np.int32 and out.media_kinds == ["audio"]


def test_placeholder_counts(fmt):
  assert chat.media_ids(ImageItem((1, 4, 6)), fmt) == [V_BOS] + [IMAGE] * 6 + [V_EOS]
  assert chat.media_ids(AudioItem(250), fmt) == [A_BOS] + [AUDIO] * 62 + [A_EOS]  # 2.5 s -> 62 tokens
  assert chat.media_ids(AudioItem(101), fmt) == [A_BOS] + [AUDIO] * 25 + [A_EOS]
  assert chat.media_ids(VideoItem((3, 4, 4), 1.0), fmt) == [V_BOS] + [VIDEO] * 12 + [V_EOS]


def test_audio_in_video_uses_the_positions_layout(fmt):
  item = VideoItem((6, 4, 4), 1.0, audio_frames=500)  # 6 s of video, 5 s of audio (125 tokens)
  ids = chat.media_ids(item, fmt)
  assert ids[:2] == [V_BOS, A_BOS] and ids[-2:] == [A_EOS, V_EOS]
  assert ids.count(VIDEO) == 24 and ids.count(AUDIO) == 125
  assert ids == audio_in_video_layout((6, 4, 4), 1.0, 125, TokenIds(), with_markers=True)
  # Interleaved by 2 s chunks: video chunk 0 (t = 0, 1 -> 8 tokens), then audio chunk 0 (50 tokens), ...
  assert ids[2:10] == [VIDEO] * 8 and ids[10:60] == [AUDIO] * 50 and ids[60] == VIDEO
  assert chat.media_token_count(item) == 24 + 125


def test_labels_cover_assistant_content_and_im_end(tok, fmt):
  msgs = chat.with_system([
      user({"type": "image"}, text("What?")), {"role": "assistant", "content": "A cat."},
      user(text("Sure?")), {"role": "assistant", "content": [text("Yes, "), text("a cat.")]}])
  out = chat.render(msgs, [ImageItem((1, 2, 2))], tok, fmt)
  ids, labels = out.input_ids, out.labels
  assert ids.shape == labels.shape
  on = labels != IGNORE
  np.testing.assert_array_equal(labels[on], ids[on])
  # The labelled runs are exactly each answer plus its <|im_end|>.
  runs, cur = [], []
  for i, t in zip(ids, on):
    if t:
      cur.append(int(i))
    elif cur:
      runs.append(cur)
      cur = []
  assert [tok.decode(r) for r in runs] == ["A cat.<|im_end|>", "Yes, a cat.<|im_end|>"]
  # Placeholders, headers and the user turn carry no loss.
  assert not on[ids == IMAGE].any() and not on[ids == IM_START].any()
  assert chat.render(msgs, [ImageItem((1, 2, 2))], tok, fmt, train_on=()).labels.max() == IGNORE


def test_answer_ids_do_not_depend_on_the_header(tok, fmt):
  out = chat.render([{"role": "assistant", "content": "Paris."}], [], tok, fmt)
  assert out.input_ids.tolist() == [IM_START] + tok.encode("assistant\n") + tok.encode("Paris.") + [IM_END, NL]


@pytest.mark.parametrize("msgs, media, match", [
    ([{"role": "robot", "content": "x"}], [], "unknown role"),
    ([user({"type": "gif"})], [], "unknown content part type"),
    ([user({"type": "image"})], [], "more media parts"),
    ([user(text("no media"))], [AudioItem(100)], "1 media items given for 0"),
    ([user({"type": "audio"})], [ImageItem((1, 2, 2))], "is 'audio' but its item is ImageItem"),
    ([user({"type": "text"})], [], "text part without"),
    ([{"role": "user", "content": 3}], [], "string or a list"),
])
def test_render_errors(tok, fmt, msgs, media, match):
  with pytest.raises(ChatError, match=match):
    chat.render(msgs, media, tok, fmt)


def test_empty_conversation():
  with pytest.raises(ChatError, match="empty"):
    chat.with_system([])
