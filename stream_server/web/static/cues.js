// Subtitle cues and transcript files. The cue rules are the server's (stream_server/formats.py,
// cue_split), implemented here once more for the browser: at most MAX_LINES lines of at most
// MAX_LINE_CHARS characters, at most MAX_CUE_S seconds per cue. tests/test_web_app.py checks that
// both cut the same words into the same cues.

export const MAX_LINE_CHARS = 42;
export const MAX_LINES = 2;
export const MAX_CUE_S = 7.0;
export const MIN_CUE_S = 1.0;
const BREAK_AFTER = /[.,!?;:\u2026\u2014]["')\]\u201d\u2019]*$/;

/** The tokens as one line, or as the two lines whose longer one is shortest (ties: shorter top). */
export function wrapLines(tokens) {
  const text = tokens.join(" ");
  if (text.length <= MAX_LINE_CHARS || tokens.length < 2) return [text];
  let best = [];
  let bestKey = null;
  for (let i = 1; i < tokens.length; i++) {
    const top = tokens.slice(0, i).join(" ");
    const bottom = tokens.slice(i).join(" ");
    const key = [Math.max(top.length, bottom.length), top.length];
    if (bestKey === null || key[0] < bestKey[0] || (key[0] === bestKey[0] && key[1] < bestKey[1])) {
      best = [top, bottom];
      bestKey = key;
    }
  }
  return best;
}

function linesFit(tokens) {
  const lines = wrapLines(tokens);
  return lines.length <= MAX_LINES && lines.every((line) => line.length <= MAX_LINE_CHARS);
}

const round3 = (x) => Math.round(x * 1000) / 1000;

/** Cut one utterance's timed words ({text, start, end}) into cues ({start, end, lines}). */
export function cueSplit(words, { prefix = "", until = null } = {}) {
  const head = prefix.trim() ? [prefix.trim()] : [];
  const fits = (group) =>
    group.length === 0 ||
    (linesFit(head.concat(group.map((w) => w.text))) && group[group.length - 1].end - group[0].start <= MAX_CUE_S);
  const groups = [];
  let current = [];
  for (const word of words) {
    if (current.length && !fits([...current, word])) {
      let cut = current.length;
      for (let i = current.length - 2; i >= 0; i--) {
        if (2 * (i + 1) >= current.length && BREAK_AFTER.test(current[i].text)) {
          cut = i + 1;
          break;
        }
      }
      groups.push(current.slice(0, cut));
      current = current.slice(cut);
      if (current.length && !fits([...current, word])) {
        groups.push(current);
        current = [];
      }
    }
    current.push(word);
  }
  if (current.length) groups.push(current);
  return groups.map((group, index) => {
    const start = group[0].start;
    let end = Math.max(group[group.length - 1].end, start);
    const limit =
      index + 1 < groups.length ? groups[index + 1][0].start : Math.max(until !== null ? until : end, end);
    end = Math.max(Math.min(Math.max(end, start + MIN_CUE_S), limit), start);
    return { start: round3(start), end: round3(end), lines: wrapLines(head.concat(group.map((w) => w.text))) };
  });
}

/** An utterance's words with times: the decoder's ({word, start, end}) when they spell `text`,
 * else the text's words spread over [start, end] in proportion to their characters. */
export function timedWords(text, start, end, words) {
  const tokens = text.split(/\s+/).filter(Boolean);
  if (words && words.length) {
    const timed = [];
    for (const w of words) {
      const wEnd = Math.max(Number(w.end) || 0, Number(w.start) || 0);
      for (const part of String(w.word).split(/\s+/).filter(Boolean)) {
        timed.push({ text: part, start: Number(w.start) || 0, end: wEnd });
      }
    }
    if (timed.length === tokens.length && timed.every((w, i) => w.text === tokens[i])) return timed;
  }
  const total = tokens.join(" ").length;
  const span = Math.max(end - start, 0);
  const out = [];
  let offset = 0;
  for (const token of tokens) {
    out.push({ text: token, start: start + (span * offset) / total, end: start + (span * (offset + token.length)) / total });
    offset += token.length + 1;
  }
  return out;
}

/** One utterance ({text, start, end, words}) as cues. */
export function segmentCues(seg, prefix = "") {
  const text = String(seg.text || "").trim();
  return cueSplit(timedWords(text, seg.start, seg.end, seg.words), { prefix, until: seg.end });
}

function timestamp(seconds, separator) {
  let ms = Math.max(0, Math.round(seconds * 1000));
  const h = Math.floor(ms / 3600000);
  ms -= h * 3600000;
  const m = Math.floor(ms / 60000);
  ms -= m * 60000;
  const s = Math.floor(ms / 1000);
  ms -= s * 1000;
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${pad(h)}:${pad(m)}:${pad(s)}${separator}${pad(ms, 3)}`;
}

/** One voice's cues with each ending no later than the next one starts. */
export function withoutOverlaps(cues) {
  return cues.map((c, i) => (i + 1 < cues.length && cues[i + 1].start < c.end ? { ...c, end: Math.max(c.start, cues[i + 1].start) } : c));
}

/** A single voice's utterances ({text, start, end, words}) as cues in time order. */
export function allCues(segments) {
  const spoken = segments.filter((s) => String(s.text || "").trim()).sort((a, b) => a.start - b.start);
  return withoutOverlaps(spoken.flatMap((s) => segmentCues(s)));
}

export function renderSrt(cues) {
  return cues
    .map((c, i) => `${i + 1}\n${timestamp(c.start, ",")} --> ${timestamp(c.end, ",")}\n${c.lines.join("\n")}\n`)
    .join("\n");
}

export function renderVtt(cues) {
  return ["WEBVTT\n", ...cues.map((c) => `${timestamp(c.start, ".")} --> ${timestamp(c.end, ".")}\n${c.lines.join("\n")}\n`)].join("\n");
}

export function renderTxt(segments) {
  return segments.map((s) => String(s.text || "").trim()).filter(Boolean).join("\n") + "\n";
}

/** mm:ss (or h:mm:ss) for a line's time. */
export function clock(seconds) {
  const total = Math.max(0, Math.floor(seconds));
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = total % 60;
  const mm = String(m).padStart(2, "0");
  const ss = String(s).padStart(2, "0");
  return h ? `${h}:${mm}:${ss}` : `${mm}:${ss}`;
}
