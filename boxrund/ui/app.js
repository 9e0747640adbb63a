// boxrun dashboard: plain JavaScript over the public API (/v1/...), same
// origin. It polls /v1/info and /v1/boxes, follows exec output over SSE and
// opens a terminal over the attach WebSocket (xterm.js, vendored, loaded on
// first use).

const REFRESH_MS = 2500; // while the server answers
const RETRY_MS = 3000; // while it does not
const REQUEST_MS = 8000; // a poll that takes longer counts as unreachable
const ACTION_MS = 300000; // stop/start/remove may take a while (a VM boots)
const MAX_EXECS = 50; // execs listed per box, newest first
const MAX_OUTPUT = 1 << 20; // characters of exec output kept per view

const $ = (sel) => document.querySelector(sel);

// h builds an element: h('td', {class: 'num'}, 'text', child).
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children) if (c != null) el.append(c);
  return el;
}

function setText(el, s) {
  s = String(s);
  if (el.textContent !== s) el.textContent = s;
}

function setAttr(el, name, v) {
  if (v == null || v === false) {
    if (el.hasAttribute(name)) el.removeAttribute(name);
  } else {
    v = v === true ? '' : String(v);
    if (el.getAttribute(name) !== v) el.setAttribute(name, v);
  }
}

// ---- formatting ----

function fmtMB(mb) {
  if (mb == null) return '–';
  if (mb >= 1024) {
    const g = mb / 1024;
    return (Number.isInteger(g) ? g : g.toFixed(1)) + ' GiB';
  }
  return mb + ' MiB';
}

function parseTime(s) {
  const t = s ? Date.parse(s) : NaN;
  return Number.isNaN(t) ? null : t;
}

function fmtDuration(ms) {
  const s = Math.max(0, Math.floor(ms / 1000));
  if (s < 60) return s + 's';
  const m = Math.floor(s / 60);
  if (m < 60) return m + 'm ' + (s % 60) + 's';
  const hr = Math.floor(m / 60);
  if (hr < 48) return hr + 'h ' + (m % 60) + 'm';
  return Math.floor(hr / 24) + 'd ' + (hr % 24) + 'h';
}

function age(s) {
  const t = parseTime(s);
  return t == null ? '–' : fmtDuration(Date.now() - t);
}

function shellWord(w) {
  return /^[\w@%+=:,./-]+$/.test(w) ? w : "'" + w.replaceAll("'", "'\\''") + "'";
}

function cmdline(cmd) {
  return (cmd || []).map(shellWord).join(' ');
}

// ---- API ----

class APIError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
  toString() {
    return this.code ? `[${this.code}] ${this.message}` : this.message;
  }
}

// Unreachable is a request that got no HTTP answer (refused, reset, timed out).
class Unreachable extends Error {}

async function api(method, path, {timeout = REQUEST_MS} = {}) {
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(), timeout);
  let res;
  try {
    res = await fetch(path, {method, cache: 'no-store', signal: ctl.signal, headers: {Accept: 'application/json'}});
  } catch (e) {
    throw new Unreachable(ctl.signal.aborted ? `no answer within ${timeout / 1000} s` : e.message || String(e));
  } finally {
    clearTimeout(timer);
  }
  const text = await res.text().catch(() => '');
  if (!res.ok) {
    // Error JSON is {"code","message"}; anything else is shown as it is.
    let code = '', message = text.trim() || `${res.status} ${res.statusText}`;
    try {
      const j = JSON.parse(text);
      if (j && typeof j.message === 'string') ({code = '', message} = j);
    } catch {}
    throw new APIError(res.status, code, message);
  }
  return text ? JSON.parse(text) : null;
}

const boxPath = (id) => '/v1/boxes/' + encodeURIComponent(id);

// ---- state ----

const state = {
  online: null, // null until the first answer
  lastContact: 0,
  failures: 0,
  timer: 0,
  busy: false,
  again: false,
  boxes: new Map(), // id -> box JSON, last poll
};

// views: id -> the DOM of one box (row, detail row, exec list, output).
const views = new Map();

// ---- connection state ----

function setOnline(ok, why) {
  const conn = $('#conn');
  const banner = $('#offline');
  if (ok) {
    state.failures = 0;
    state.lastContact = Date.now();
    conn.dataset.state = 'live';
    setText($('#conn-text'), 'Live · refreshes every ' + REFRESH_MS / 1000 + ' s');
    banner.hidden = true;
    $('#main').classList.remove('stale');
  } else {
    state.failures++;
    conn.dataset.state = 'offline';
    setText($('#conn-text'), 'Server unreachable');
    const last = state.lastContact ? `Last contact ${new Date(state.lastContact).toLocaleTimeString()}.` : '';
    setText($('#offline-detail'), `${last} Attempt ${state.failures}${why ? ': ' + why : ''}.`);
    banner.hidden = false;
    $('#main').classList.add('stale');
  }
  if (state.online !== ok) {
    state.online = ok;
    for (const v of views.values()) updateBox(v); // enable or disable the buttons
  }
}

// ---- polling ----

async function tick() {
  if (state.busy) {
    state.again = true;
    return;
  }
  state.busy = true;
  clearTimeout(state.timer);
  try {
    const [info, boxes] = await Promise.all([api('GET', '/v1/info'), api('GET', '/v1/boxes')]);
    setOnline(true);
    renderInfo(info, boxes);
    renderBoxes(boxes);
    await Promise.all([...views.values()].filter((v) => v.expanded).map(refreshExecs));
  } catch (e) {
    if (e instanceof Unreachable) setOnline(false, e.message);
    else if (e instanceof APIError && e.status >= 500) setOnline(false, String(e));
    else {
      setOnline(true);
      toast('Refresh failed', String(e), 'refresh');
    }
  } finally {
    state.busy = false;
    if (state.again) {
      state.again = false;
      queueMicrotask(tick);
    } else {
      state.timer = setTimeout(tick, state.online ? REFRESH_MS : RETRY_MS);
    }
  }
}

function refreshNow() {
  clearTimeout(state.timer);
  tick();
}

// ---- host totals ----

function meter(el, used, max) {
  const f = max > 0 ? Math.min(1, used / max) : 0;
  el.firstElementChild.style.width = (f * 100).toFixed(1) + '%';
  el.classList.toggle('high', f >= 0.9);
  setAttr(el, 'aria-valuemax', max);
  setAttr(el, 'aria-valuenow', used);
  setAttr(el, 'aria-valuetext', `${used} of ${max}`);
}

function renderInfo(info, boxes) {
  setText($('#cpu-used'), info.used_cpu ?? '–');
  setText($('#cpu-max'), info.max_cpu);
  meter($('#cpu-bar'), info.used_cpu || 0, info.max_cpu || 0);
  setText($('#mem-used'), fmtMB(info.used_memory_mb));
  setText($('#mem-max'), fmtMB(info.max_memory_mb));
  meter($('#mem-bar'), info.used_memory_mb || 0, info.max_memory_mb || 0);
  const running = info.running_boxes ?? boxes.filter((b) => b.status === 'running').length;
  setText($('#running'), running);
  setText($('#box-total'), `of ${boxes.length} ${boxes.length === 1 ? 'box' : 'boxes'}`);
  setText($('#hypervisor'), info.hypervisor || '–');
  setText($('#version'), info.version || '–');
  document.title = `boxrun · ${running} running`;
}

// ---- boxes ----

function label(b) {
  return b.name || b.id;
}

function renderBoxes(list) {
  list.sort((a, b) => (b.created_at || '').localeCompare(a.created_at || '') || a.id.localeCompare(b.id));
  const tbody = $('#boxes');
  const seen = new Set();
  let prev = null;
  for (const b of list) {
    seen.add(b.id);
    state.boxes.set(b.id, b);
    let v = views.get(b.id);
    if (!v) {
      v = makeBox(b.id);
      views.set(b.id, v);
    }
    v.box = b;
    updateBox(v);
    // Keep the order without moving rows that are in place (a moved row
    // would lose the focus of its buttons).
    for (const row of [v.row, v.detail]) {
      if (row.previousSibling !== prev || row.parentNode !== tbody) tbody.insertBefore(row, prev ? prev.nextSibling : tbody.firstChild);
      prev = row;
    }
  }
  for (const [id, v] of views) {
    if (seen.has(id)) continue;
    closeOutput(v);
    v.row.remove();
    v.detail.remove();
    views.delete(id);
    state.boxes.delete(id);
    if (term.box === id) setTermState('error', 'The box was removed.');
  }
  $('#empty').hidden = list.length > 0;
  $('#box-table').parentElement.hidden = list.length === 0;
}

function makeBox(id) {
  const v = {id, box: null, expanded: false, pending: null, armed: 0, execs: null, out: null};
  const detailID = 'execs-' + id;
  v.disclose = h('button', {type: 'button', class: 'disclose', 'aria-expanded': 'false', 'aria-controls': detailID, dataset: {action: 'execs'}, onclick: () => toggle(v)});
  v.label = h('span', {class: 'label'});
  v.idLabel = h('span', {class: 'id mono'});
  v.badge = h('span', {class: 'badge'});
  v.image = h('span', {class: 'image mono'});
  v.cpu = h('td', {class: 'num'});
  v.mem = h('td', {class: 'num'});
  v.age = h('time');
  v.termBtn = h('button', {type: 'button', class: 'btn', dataset: {action: 'terminal'}, onclick: () => openTerminal(v.id)}, 'Terminal');
  v.powerBtn = h('button', {type: 'button', class: 'btn', onclick: () => act(v, v.powerBtn.dataset.action)});
  v.removeBtn = h('button', {type: 'button', class: 'btn danger', dataset: {action: 'remove'}, onclick: () => removeClicked(v)}, 'Remove');
  v.row = h('tr', {class: 'box-row', dataset: {box: id}},
    h('th', {scope: 'row'}, h('div', {class: 'box-name'}, v.disclose, v.label, v.idLabel)),
    h('td', {}, v.badge),
    h('td', {}, v.image),
    v.cpu, v.mem,
    h('td', {}, v.age),
    h('td', {}, h('div', {class: 'actions'}, v.termBtn, v.powerBtn, v.removeBtn)));
  v.execList = h('div', {class: 'exec-list'});
  v.outWrap = h('div', {class: 'output', hidden: true});
  v.detail = h('tr', {class: 'detail', id: detailID, hidden: true, dataset: {boxDetail: id}},
    h('td', {colspan: 7}, h('h3', {}, 'Execs'), v.execList, v.outWrap));
  return v;
}

function updateBox(v) {
  const b = v.box;
  if (!b) return;
  const name = label(b);
  setText(v.label, name);
  setText(v.idLabel, b.name ? b.id : '');
  setAttr(v.disclose, 'aria-label', `Execs of ${name}`);
  const shown = v.pending ? {stop: 'stopping', start: 'starting', remove: 'removing'}[v.pending] : b.status;
  setText(v.badge, shown);
  setAttr(v.badge, 'class', 'badge ' + shown);
  setText(v.image, b.image);
  setAttr(v.image, 'title', b.image);
  setText(v.cpu, b.cpu);
  setText(v.mem, fmtMB(b.memory_mb));
  setText(v.age, age(b.created_at));
  setAttr(v.age, 'datetime', b.created_at);
  setAttr(v.age, 'title', b.created_at ? new Date(parseTime(b.created_at)).toLocaleString() : null);

  const off = state.online === false || v.pending != null;
  const running = b.status === 'running';
  const stoppable = running || b.status === 'creating';
  const action = stoppable ? 'stop' : 'start';
  v.powerBtn.dataset.action = action;
  setText(v.powerBtn, stoppable ? 'Stop' : 'Start');
  setAttr(v.powerBtn, 'aria-label', `${stoppable ? 'Stop' : 'Start'} ${name}`);
  v.powerBtn.disabled = off;
  setAttr(v.termBtn, 'aria-label', `Open a terminal in ${name}`);
  v.termBtn.disabled = off || !running;
  setAttr(v.removeBtn, 'aria-label', v.armed ? `Confirm: remove ${name}` : `Remove ${name}`);
  setText(v.removeBtn, v.armed ? 'Confirm remove' : 'Remove');
  v.removeBtn.classList.toggle('armed', !!v.armed);
  v.removeBtn.disabled = off;
}

// Remove asks once more on the button itself (no modal dialog): a second
// click within 4 s removes the box, running or not.
function removeClicked(v) {
  if (v.armed) {
    clearTimeout(v.armed);
    v.armed = 0;
    act(v, 'remove');
    return;
  }
  v.armed = setTimeout(() => {
    v.armed = 0;
    updateBox(v);
  }, 4000);
  updateBox(v);
}

async function act(v, action) {
  const name = label(v.box);
  v.pending = action;
  updateBox(v);
  try {
    if (action === 'remove') await api('DELETE', boxPath(v.id) + '?force=true', {timeout: ACTION_MS});
    else await api('POST', boxPath(v.id) + ':' + action, {timeout: ACTION_MS});
    if (action === 'remove' && term.box === v.id) closeTerminal();
  } catch (e) {
    toast(`Could not ${action} ${name}`, String(e));
  } finally {
    v.pending = null;
    if (views.get(v.id) === v) updateBox(v);
    refreshNow();
  }
}

// ---- execs ----

function toggle(v) {
  v.expanded = !v.expanded;
  v.disclose.setAttribute('aria-expanded', String(v.expanded));
  v.detail.hidden = !v.expanded;
  if (v.expanded) {
    if (!v.execs) v.execList.replaceChildren(h('p', {class: 'none'}, 'Loading…'));
    refreshExecs(v);
  } else {
    closeOutput(v);
  }
}

async function refreshExecs(v) {
  let execs;
  try {
    execs = await api('GET', boxPath(v.id) + '/execs');
  } catch (e) {
    if (e instanceof APIError && e.status === 404) return; // removed meanwhile
    if (e instanceof Unreachable) return; // the poll says so
    v.execList.replaceChildren(h('p', {class: 'none'}, 'Could not list the execs: ' + e));
    return;
  }
  if (!v.expanded) return;
  execs.sort((a, b) => (b.created_at || '').localeCompare(a.created_at || ''));
  v.execs = execs;
  renderExecs(v);
  // Show the newest exec's output the first time, when there is one.
  if (!v.out && !v.outClosed && execs.length) showOutput(v, execs[0]);
}

function renderExecs(v) {
  const execs = v.execs;
  if (!execs.length) {
    v.execList.replaceChildren(h('p', {class: 'none'}, 'No execs yet.'));
    return;
  }
  let table = v.execList.querySelector('table');
  if (!table) {
    table = h('table', {class: 'execs'},
      h('thead', {}, h('tr', {},
        h('th', {scope: 'col'}, 'Exec'), h('th', {scope: 'col'}, 'Command'), h('th', {scope: 'col'}, 'Status'),
        h('th', {scope: 'col', class: 'num'}, 'Exit'), h('th', {scope: 'col'}, 'Started'), h('th', {scope: 'col'}, 'Ran'),
        h('th', {scope: 'col'}, h('span', {class: 'sr-only'}, 'Output')))),
      h('tbody'));
    v.execList.replaceChildren(table);
    v.execRows = new Map();
  }
  const tbody = table.tBodies[0];
  const shown = execs.slice(0, MAX_EXECS);
  const seen = new Set();
  let prev = null;
  for (const x of shown) {
    seen.add(x.id);
    let r = v.execRows.get(x.id);
    if (!r) {
      r = {
        badge: h('span', {class: 'badge'}), exit: h('td', {class: 'num'}), started: h('time'), ran: h('td'),
        btn: h('button', {type: 'button', class: 'btn small', dataset: {action: 'output'}}, 'Output'),
      };
      r.btn.addEventListener('click', () => showOutput(v, v.execs.find((e) => e.id === x.id) || x, true));
      r.row = h('tr', {dataset: {exec: x.id}},
        h('td', {class: 'mono'}, x.id),
        h('td', {class: 'cmd mono', title: cmdline(x.cmd)}, cmdline(x.cmd)),
        h('td', {}, r.badge), r.exit, h('td', {}, r.started), r.ran, h('td', {}, r.btn));
      v.execRows.set(x.id, r);
    }
    setText(r.badge, x.status);
    setAttr(r.badge, 'class', 'badge ' + x.status);
    setText(r.exit, x.exit_code ?? '');
    setText(r.started, age(x.created_at) + ' ago');
    setAttr(r.started, 'datetime', x.created_at);
    const t0 = parseTime(x.created_at), t1 = parseTime(x.finished_at);
    setText(r.ran, t0 == null ? '' : fmtDuration((t1 ?? Date.now()) - t0));
    const sel = v.out && v.out.id === x.id;
    r.row.classList.toggle('selected', !!sel);
    setAttr(r.btn, 'aria-pressed', String(!!sel));
    setAttr(r.btn, 'aria-label', `Output of ${x.id}`);
    if (r.row.previousSibling !== prev || r.row.parentNode !== tbody) tbody.insertBefore(r.row, prev ? prev.nextSibling : tbody.firstChild);
    prev = r.row;
  }
  for (const [id, r] of v.execRows) {
    if (!seen.has(id)) {
      r.row.remove();
      v.execRows.delete(id);
    }
  }
  let more = v.execList.querySelector('.more');
  if (execs.length > MAX_EXECS) {
    if (!more) v.execList.append((more = h('p', {class: 'none more'})));
    setText(more, `${execs.length - MAX_EXECS} older execs not shown.`);
  } else if (more) more.remove();
}

// showOutput follows an exec's events. The server replays every event from
// seq 0 on each (re)connection, so events at or below the last seq seen are
// skipped; after the exit event the stream is closed (EventSource would
// otherwise reconnect).
function showOutput(v, x, focus) {
  closeOutput(v);
  v.outClosed = false;
  const pre = h('pre', {tabindex: '0', 'aria-label': `Output of ${x.id}`});
  const st = h('span', {class: 'state', role: 'status'}, 'connecting…');
  const close = h('button', {type: 'button', class: 'btn small', onclick: () => {
    closeOutput(v);
    v.outClosed = true;
  }}, 'Hide output');
  v.outWrap.replaceChildren(
    h('div', {class: 'output-head'}, h('h3', {}, 'Output of ', h('span', {class: 'mono'}, x.id)), st, close), pre);
  v.outWrap.hidden = false;
  const out = {id: x.id, es: null, lastSeq: -1, pre, st, queue: [], size: 0, raf: 0, done: false};
  v.out = out;
  const es = new EventSource(boxPath(v.id) + '/exec/' + encodeURIComponent(x.id) + '/events');
  out.es = es;
  es.onopen = () => {
    if (!out.done) setText(st, 'running · live');
  };
  es.addEventListener('log', (ev) => {
    const d = JSON.parse(ev.data);
    if (d.seq <= out.lastSeq) return;
    out.lastSeq = d.seq;
    out.queue.push([d.stream === 'stderr' ? 'stderr' : 'stdout', d.data]);
    if (!out.raf) out.raf = requestAnimationFrame(() => flush(out));
  });
  es.addEventListener('exit', (ev) => {
    const d = JSON.parse(ev.data);
    let r = d.data;
    try {
      r = JSON.parse(r);
    } catch {}
    out.done = true;
    es.close();
    const code = r && typeof r === 'object' ? r.exit_code : null;
    let s = code == null ? 'ended (no exit code)' : `exited with code ${code}`;
    if (r && r.error) s += ' · ' + r.error;
    setText(st, s);
    flush(out);
    if (out.size === 0) pre.append(h('span', {class: 'note'}, '(no output)'));
    refreshNow();
  });
  es.onerror = () => {
    if (out.done) return;
    setText(st, es.readyState === EventSource.CLOSED ? 'stream closed' : 'reconnecting…');
  };
  if (v.execs) renderExecs(v);
  if (focus) pre.focus();
}

function flush(out) {
  out.raf = 0;
  if (!out.queue.length) return;
  const pre = out.pre;
  const atBottom = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 24;
  for (const [stream, text] of out.queue) {
    const last = pre.lastChild;
    if (last && last.className === stream) last.append(text);
    else pre.append(h('span', {class: stream}, text));
    out.size += text.length;
  }
  out.queue = [];
  while (out.size > MAX_OUTPUT && pre.firstChild) {
    const first = pre.firstChild;
    if (first.className === 'note') {
      first.remove();
      continue;
    }
    const cut = out.size - MAX_OUTPUT;
    const len = first.textContent.length;
    if (len <= cut) {
      first.remove();
      out.size -= len;
    } else {
      first.textContent = first.textContent.slice(cut);
      out.size -= cut;
    }
  }
  if (out.size >= MAX_OUTPUT && !(pre.firstChild && pre.firstChild.className === 'note')) {
    pre.prepend(h('span', {class: 'note'}, '[earlier output not shown]\n'));
  }
  if (atBottom) pre.scrollTop = pre.scrollHeight;
}

function closeOutput(v) {
  if (!v.out) return;
  v.out.es.close();
  cancelAnimationFrame(v.out.raf);
  v.out = null;
  v.outWrap.hidden = true;
  v.outWrap.replaceChildren();
  if (v.execs && v.execRows) renderExecs(v);
}

// ---- terminal ----

const term = {box: null, ws: null, xterm: null, fit: null, ro: null, opener: null, ended: false};
let xtermModules;

function setTermState(s, text) {
  const el = $('#term-state');
  el.dataset.state = s;
  setText(el, text);
  $('#term-reconnect').hidden = !(s === 'closed' || s === 'error' || s === 'exited');
}

async function openTerminal(id) {
  closeTerminal();
  const b = state.boxes.get(id);
  term.box = id;
  term.opener = document.activeElement;
  term.ended = false;
  const sec = $('#term');
  sec.hidden = false;
  setText($('#term-box'), '· ' + (b ? label(b) : id));
  setTermState('connecting', 'Loading…');
  try {
    xtermModules ||= Promise.all([import('./vendor/xterm.mjs'), import('./vendor/addon-fit.mjs')]);
    const [{Terminal}, {FitAddon}] = await xtermModules;
    if (term.box !== id) return;
    const screen = $('#term-screen');
    screen.replaceChildren();
    const xt = new Terminal({
      cursorBlink: true, fontSize: 13, scrollback: 5000,
      fontFamily: 'ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace',
      theme: {background: '#0f1420', foreground: '#dfe4ee', cursor: '#dfe4ee', selectionBackground: '#3a4a6b'},
    });
    const fit = new FitAddon();
    xt.loadAddon(fit);
    xt.open(screen);
    fit.fit();
    term.xterm = xt;
    term.fit = fit;
    term.ro = new ResizeObserver(() => {
      try {
        fit.fit();
      } catch {}
    });
    term.ro.observe(screen);
    xt.onData((d) => send(new TextEncoder().encode(d)));
    xt.onBinary((d) => send(Uint8Array.from(d, (c) => c.charCodeAt(0) & 0xff)));
    xt.onResize(({cols, rows}) => {
      screen.dataset.size = `${rows} ${cols}`;
      sendText({type: 'resize', cols, rows});
    });
    screen.dataset.size = `${xt.rows} ${xt.cols}`;
    sec.scrollIntoView({block: 'nearest', behavior: 'smooth'});
    connect();
  } catch (e) {
    setTermState('error', 'Could not load the terminal: ' + e);
  }
}

function connect() {
  const xt = term.xterm;
  if (!xt) return;
  term.ended = false;
  const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const q = new URLSearchParams({cols: xt.cols, rows: xt.rows, term: 'xterm-256color'});
  const ws = new WebSocket(`${proto}//${location.host}${boxPath(term.box)}/attach?${q}`);
  ws.binaryType = 'arraybuffer';
  term.ws = ws;
  setTermState('connecting', 'Connecting…');
  ws.onopen = () => {
    if (term.ws !== ws) return;
    setTermState('connected', 'Connected');
    xt.focus();
  };
  ws.onmessage = (ev) => {
    if (term.ws !== ws) return;
    if (typeof ev.data !== 'string') {
      xt.write(new Uint8Array(ev.data));
      return;
    }
    let m;
    try {
      m = JSON.parse(ev.data);
    } catch {
      return;
    }
    if (m.type === 'exit') {
      term.ended = true;
      setTermState('exited', `Exited with code ${m.code}`);
      xt.write(`\r\n\x1b[2m[exited with code ${m.code}]\x1b[0m\r\n`);
    } else if (m.type === 'error') {
      term.ended = true;
      const msg = m.code ? `[${m.code}] ${m.message}` : m.message;
      setTermState('error', msg);
      xt.write(`\r\n\x1b[31m${msg}\x1b[0m\r\n`);
    }
  };
  ws.onclose = (ev) => {
    if (term.ws !== ws) return;
    term.ws = null;
    if (!term.ended) setTermState('closed', ev.code === 1000 ? 'Disconnected' : `Connection lost (${ev.code})`);
  };
}

function send(bytes) {
  if (term.ws && term.ws.readyState === WebSocket.OPEN) term.ws.send(bytes);
}

function sendText(obj) {
  if (term.ws && term.ws.readyState === WebSocket.OPEN) term.ws.send(JSON.stringify(obj));
}

function closeTerminal() {
  const opener = term.opener;
  if (term.ws) {
    const ws = term.ws;
    term.ws = null;
    ws.close(1000);
  }
  if (term.ro) term.ro.disconnect();
  if (term.xterm) term.xterm.dispose();
  Object.assign(term, {box: null, xterm: null, fit: null, ro: null, opener: null});
  $('#term').hidden = true;
  $('#term-screen').replaceChildren();
  if (opener && opener.isConnected && !opener.disabled) opener.focus();
}

// ---- errors ----

function toast(title, message, key) {
  const box = $('#toasts');
  if (key) box.querySelector(`[data-key="${key}"]`)?.remove();
  const close = h('button', {type: 'button', class: 'btn small', 'aria-label': 'Dismiss'}, '×');
  const t = h('div', {class: 'toast', dataset: key ? {key} : {}}, h('p', {}, h('strong', {}, title), h('br'), message), close);
  const remove = () => t.remove();
  close.addEventListener('click', remove);
  setTimeout(remove, 10000);
  box.append(t);
}

// ---- start ----

$('#retry').addEventListener('click', refreshNow);
$('#term-close').addEventListener('click', closeTerminal);
$('#term-reconnect').addEventListener('click', () => {
  if (term.xterm) {
    term.xterm.reset();
    connect();
  }
});
document.addEventListener('visibilitychange', () => {
  if (!document.hidden) refreshNow();
});
tick();
