// lorafit review: edit captions, filter by tag, bulk tag operations, save with conflict detection.
// Plain JavaScript, no build step and nothing fetched from elsewhere: the page must work offline.
"use strict";

// ---- tag rules: the same as lorafit/captioning/tags.py ------------------------------------------
const EMOTICON_HALF = /^[^A-Za-z]{1,3}$|^[^A-Za-z]?[A-Za-z][^A-Za-z]?$/;
const isEmoticon = (tag) => { const h = tag.split("_"); return h.length === 2 && h.every((x) => EMOTICON_HALF.test(x)); };
const tagKey = (tag) => { const t = tag.trim().toLowerCase(); return isEmoticon(t) ? t : t.replaceAll("_", " "); };
const splitTags = (text) => text.split(",").map((t) => t.trim()).filter(Boolean);
// The caption line: the first non-blank line, the only one training reads (tags.py caption_line).
// Tag chips, tag filters and bulk operations work on it; the file's other lines are left as they are.
const LINE_BREAK = /(\r\n|[\n\r\v\f\x1c-\x1e\x85\u2028\u2029])/;  // the breaks of Python's str.splitlines
function captionLine(text) {
  const parts = text.split(LINE_BREAK);  // line, break, line, break, ..., line
  for (let i = 0; i < parts.length; i += 2) {
    if (parts[i].trim()) return { before: parts.slice(0, i).join(""), line: parts[i], after: parts.slice(i + 1).join("") };
  }
  return { before: text, line: "", after: "" };
}
const captionTags = (text) => splitTags(captionLine(text).line);
function joinTags(tags) {
  const seen = new Set(), kept = [];
  for (const tag of tags) { const k = tagKey(tag); if (k && !seen.has(k)) { seen.add(k); kept.push(tag.trim()); } }
  return kept.join(", ");
}
const sameTags = (a, b) => a.length === b.length && a.every((t, i) => tagKey(t) === tagKey(b[i]));

// Each operation returns the new caption, or the old text unchanged when the tags did not change
// (so a bulk operation never rewrites, and never .bak's, a caption it does not affect).
const OPERATIONS = {
  remove: (tags, tag) => tags.filter((t) => tagKey(t) !== tagKey(tag)),
  add: (tags, tag) => [...tags, tag],
  replace: (tags, tag, replacement) => tags.map((t) => (tagKey(t) === tagKey(tag) ? replacement : t)),
  prepend: (tags, trigger) => [trigger, ...tags.filter((t) => tagKey(t) !== tagKey(trigger))],
};
function applyOperation(text, op, ...args) {
  const { before, line, after } = captionLine(text);
  const old = splitTags(line);
  const changed = splitTags(joinTags(OPERATIONS[op](old, ...args)));
  return sameTags(old, changed) ? text : before + changed.join(", ") + after;
}

// ---- state --------------------------------------------------------------------------------------
const state = { items: [], visible: [], selected: 0, byId: new Map() };
const $ = (id) => document.getElementById(id);

function setStatus(message, isError = false) {
  const status = $("status");
  status.textContent = message;
  status.classList.toggle("error", isError);
}

async function load() {
  const response = await fetch("/api/items");
  const data = await response.json();
  state.items = data.items.map((item) => ({ ...item, saved: item.text, conflict: null }));
  state.byId = new Map(state.items.map((item) => [item.id, item]));
  document.title = `lorafit review - ${data.roots.join(", ")}`;
  const notes = [...data.notes, ...(data.reminder ? [data.reminder] : [])];
  setStatus(notes.join(" \u00b7 ") || `${state.items.length} images in ${data.roots.join(", ")} (captions: *${data.caption_ext})`);
  render();
}

// ---- filtering ----------------------------------------------------------------------------------
function filterTerms() {
  return splitTags($("search").value).map((term) =>
    term.startsWith("-") ? { exclude: true, key: tagKey(term.slice(1)) } : { exclude: false, key: tagKey(term) });
}
function matches(item, terms) {
  const keys = new Set(captionTags(item.text).map(tagKey));
  const haystack = `${item.path} ${item.text}`.toLowerCase();
  return terms.every(({ exclude, key }) => {
    if (!key) return true;
    const hit = keys.has(key) || (!exclude && haystack.includes(key));
    return exclude ? !hit : hit;
  });
}

// ---- rendering ----------------------------------------------------------------------------------
function render() {
  const terms = filterTerms();
  state.visible = state.items.filter((item) => matches(item, terms));
  state.selected = Math.min(state.selected, Math.max(state.visible.length - 1, 0));
  const container = $("items");
  container.replaceChildren(...state.visible.map(cardFor));
  renderTags();
  renderSummary();
  highlight(false);
}

function cardFor(item) {
  const card = $("card").content.firstElementChild.cloneNode(true);
  card.dataset.id = item.id;
  const img = card.querySelector("img");
  img.src = `/api/image?id=${encodeURIComponent(item.id)}`;
  img.alt = item.path;
  card.querySelector(".path").textContent = item.path;
  card.querySelector(".path").title = item.path;
  const box = card.querySelector(".caption");
  box.value = item.text;
  box.addEventListener("input", () => { item.text = box.value; refreshCard(item); renderTagsSoon(); renderSummary(); });
  box.addEventListener("focus", () => { state.selected = state.visible.indexOf(item); highlight(false); });
  card.querySelector(".save").addEventListener("click", () => save([item]));
  card.querySelector(".take-disk").addEventListener("click", () => {
    item.text = item.saved = item.conflict.text; item.version = item.conflict.version; item.conflict = null;
    refreshCard(item, true); renderTags(); renderSummary();
  });
  card.querySelector(".keep-mine").addEventListener("click", () => {
    // Take the disk version as the base, so the save below replaces exactly what is there now.
    item.saved = item.conflict.text; item.version = item.conflict.version; item.conflict = null; save([item]);
  });
  card.addEventListener("click", (event) => {
    if (event.target.tagName === "BUTTON") return;
    state.selected = state.visible.indexOf(item); highlight(false);
  });
  refreshCard(item, false, card);
  return card;
}

function cardElement(item) { return $("items").querySelector(`.card[data-id="${CSS.escape(item.id)}"]`); }

function refreshCard(item, rewriteText = false, card = cardElement(item)) {
  if (!card) return;
  const dirty = item.text !== item.saved;
  card.classList.toggle("dirty", dirty);
  card.classList.toggle("conflicted", Boolean(item.conflict));
  card.querySelector(".state").textContent = item.conflict ? "conflict" : dirty ? "unsaved" : item.version === "absent" ? "no caption file" : "saved";
  const conflict = card.querySelector(".conflict");
  conflict.hidden = !item.conflict;
  if (item.conflict) conflict.querySelector(".disk").textContent = item.conflict.text || "(empty or deleted)";
  if (rewriteText) card.querySelector(".caption").value = item.text;
}

let tagTimer = null;
function renderTags() {
  clearTimeout(tagTimer);  // a pending delayed refresh is now redundant
  const counts = new Map(), spelling = new Map();
  for (const item of state.items) {
    for (const key of new Set(captionTags(item.text).map((t) => { const k = tagKey(t); if (!spelling.has(k)) spelling.set(k, t); return k; }))) {
      counts.set(key, (counts.get(key) || 0) + 1);
    }
  }
  const active = new Set(filterTerms().filter((t) => !t.exclude).map((t) => t.key));
  const chips = [...counts.entries()].sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0])).map(([key, count]) => {
    const chip = document.createElement("button");
    chip.className = "chip" + (active.has(key) ? " active" : "");
    chip.dataset.tag = spelling.get(key);
    chip.append(spelling.get(key));
    const number = document.createElement("span");
    number.className = "count";
    number.textContent = count;
    chip.append(number);
    chip.title = `${count} captions; click to filter by it`;
    chip.addEventListener("click", () => toggleFilterTag(spelling.get(key)));
    return chip;
  });
  $("tags").replaceChildren(...chips);
}
function renderTagsSoon() { clearTimeout(tagTimer); tagTimer = setTimeout(renderTags, 300); }

function renderSummary() {
  const dirty = state.items.filter((item) => item.text !== item.saved).length;
  $("summary").textContent = `${state.items.length} images \u00b7 ${state.visible.length} shown \u00b7 ${dirty} unsaved`;
}

function toggleFilterTag(tag) {
  const terms = splitTags($("search").value);
  const kept = terms.filter((t) => tagKey(t) !== tagKey(tag));
  $("search").value = (kept.length === terms.length ? [...terms, tag] : kept).join(", ");
  render();
}

// ---- saving -------------------------------------------------------------------------------------
async function save(items) {
  const changed = items.filter((item) => item.text !== item.saved);
  if (!changed.length) { setStatus("nothing to save"); return; }
  const body = JSON.stringify({ changes: changed.map(({ id, text, version }) => ({ id, text, version })) });
  let response, data;
  try {
    response = await fetch("/api/save", { method: "POST", headers: { "Content-Type": "application/json" }, body });
    data = await response.json();
  } catch (error) { setStatus(`save failed: ${error}`, true); return; }
  if (!data.results) { setStatus(`save refused: ${data.error}`, true); return; }
  let saved = 0, conflicts = 0;
  for (const result of data.results) {
    const item = state.byId.get(result.id);
    if (result.status === "conflict") {
      item.conflict = { text: result.text, version: result.version }; conflicts += 1;
    } else {
      item.saved = result.text; item.version = result.version; item.conflict = null;
      if (result.status === "saved") saved += 1;
    }
    refreshCard(item);
  }
  renderTags(); renderSummary();
  if (conflicts) setStatus(`saved ${saved}; ${conflicts} caption(s) changed on disk since loading were NOT saved (409) - see the red cards`, true);
  else setStatus(`saved ${saved} caption(s); previous texts kept as .bak`);
}

// ---- bulk operations ----------------------------------------------------------------------------
function bulkTargets() { return $("bulk-scope").value === "all" ? state.items : state.visible; }

function bulk(op, ...args) {
  const targets = bulkTargets();
  const touched = [];
  for (const item of targets) {
    const text = applyOperation(item.text, op, ...args);
    if (text !== item.text) { item.text = text; touched.push(item); refreshCard(item, true); }
  }
  if (!touched.length) { setStatus(`${op}: none of the ${targets.length} captions changed`); return Promise.resolve(); }
  setStatus(`${op}: ${touched.length} of ${targets.length} captions changed; saving...`);
  return save(touched).then(render);
}

$("bulk-op").addEventListener("change", () => { $("bulk-with").hidden = $("bulk-op").value !== "replace"; });
$("bulk-apply").addEventListener("click", () => {
  const op = $("bulk-op").value, tag = $("bulk-tag").value.trim(), replacement = $("bulk-with").value.trim();
  if (!tag || (op === "replace" && !replacement)) { setStatus("give the tag (and its replacement) first", true); return; }
  bulk(op, tag, replacement);
});
$("prepend").addEventListener("click", () => {
  const trigger = $("trigger").value.trim().replace(/,$/, "");
  if (!trigger) { setStatus("type the trigger word first", true); return; }
  bulk("prepend", trigger);
});
$("save-all").addEventListener("click", () => save(state.items));
$("search").addEventListener("input", render);

// ---- keyboard -----------------------------------------------------------------------------------
function highlight(scroll = true) {
  const cards = $("items").children;
  for (const card of cards) card.classList.remove("selected");
  const card = cards[state.selected];
  if (!card) return;
  card.classList.add("selected");
  if (scroll) card.scrollIntoView({ block: "nearest" });
}
function move(step) {
  if (!state.visible.length) return;
  state.selected = Math.max(0, Math.min(state.visible.length - 1, state.selected + step));
  highlight();
  $("items").children[state.selected].focus({ preventScroll: true });
}

document.addEventListener("keydown", (event) => {
  if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "s") {
    event.preventDefault();
    save(state.items);
    return;
  }
  const typing = ["TEXTAREA", "INPUT", "SELECT"].includes(event.target.tagName);
  if (typing) {
    if (event.key === "Escape") { event.target.blur(); highlight(); }
    return;
  }
  if (event.key === "j" || event.key === "ArrowDown") { event.preventDefault(); move(1); }
  else if (event.key === "k" || event.key === "ArrowUp") { event.preventDefault(); move(-1); }
  else if (event.key === "Enter") {
    const card = $("items").children[state.selected];
    if (card) { event.preventDefault(); card.querySelector(".caption").focus(); }
  } else if (event.key === "/") { event.preventDefault(); $("search").focus(); }
});

window.addEventListener("beforeunload", (event) => {
  if (state.items.some((item) => item.text !== item.saved)) event.preventDefault();
});

load().catch((error) => setStatus(`cannot load the dataset: ${error}`, true));
