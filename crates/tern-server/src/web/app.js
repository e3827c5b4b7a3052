// tern web view: live updates from /v1/events (EventSource, no polling), operator buttons
// that call the API and show its answer. Hand-written, no build step, no dependency.
(function () {
  'use strict';

  // Which views an event of each kind can change.
  const TOUCHES = {
    host: ['hosts', 'migrations'],
    migration: ['migrations', 'evacuations', 'hosts'],
    evacuation: ['evacuations', 'migrations', 'hosts'],
    progress: ['migrations', 'evacuations'],
  };
  const ALL = ['hosts', 'migrations', 'evacuations'];
  const views = {};
  document.querySelectorAll('[data-fragment]').forEach(function (el) {
    views[el.dataset.fragment] = { el: el, busy: false, again: 0 };
  });

  // Re-fetches one view's HTML; a refresh asked for while one is in flight runs once after it,
  // so a burst of events costs at most two requests per view.
  function refresh(name, eventMs) {
    const v = views[name];
    if (!v) return;
    if (v.busy) { v.again = Math.max(v.again, eventMs || 1); return; }
    v.busy = true;
    fetch('/ui/fragment/' + name, { credentials: 'same-origin', cache: 'no-store' })
      .then(function (r) {
        if (r.status === 401) { location.reload(); throw new Error('logged out'); }
        return r.text();
      })
      .then(function (html) {
        // What the user is typing survives the redraw.
        const kept = {};
        v.el.querySelectorAll('input[id]').forEach(function (i) { kept[i.id] = i.value; });
        const focused = document.activeElement && v.el.contains(document.activeElement)
          ? document.activeElement.id : '';
        v.el.innerHTML = html;
        Object.keys(kept).forEach(function (id) {
          const i = document.getElementById(id);
          if (i) i.value = kept[id];
        });
        if (focused && document.getElementById(focused)) document.getElementById(focused).focus();
        if (eventMs) v.el.dataset.eventMs = String(eventMs);
        v.el.dataset.appliedMs = String(Date.now());
        grow();
        showArmed();
      })
      .catch(function (e) { notice('could not refresh ' + name + ': ' + e.message, true); })
      .finally(function () {
        v.busy = false;
        if (v.again) { const t = v.again; v.again = 0; refresh(name, t); }
      });
  }

  function notice(text, bad) {
    const n = document.getElementById('notice');
    n.textContent = text;
    n.className = bad ? 'bad' : 'ok';
    n.dataset.at = String(Date.now());
  }

  function logEvent(ev) {
    const ol = document.getElementById('events');
    const li = document.createElement('li');
    const t = new Date(ev.wall_ms).toISOString().substring(11, 19);
    li.textContent = t + ' ' + ev.kind + ' ' + ev.id + ' ' + ev.state + (ev.detail ? ': ' + ev.detail : '');
    ol.insertBefore(li, ol.firstChild);
    while (ol.children.length > 40) ol.removeChild(ol.lastChild);
  }

  const live = document.getElementById('live');
  let opened = false;
  const es = new EventSource('/v1/events');
  es.onopen = function () {
    live.textContent = 'live';
    live.dataset.live = '1';
    // After a reconnect, events may have been missed: re-read every view.
    if (opened) ALL.forEach(function (n) { refresh(n, 0); });
    opened = true;
  };
  es.onerror = function () {
    live.textContent = 'reconnecting…';
    live.dataset.live = '0';
  };
  // Progress reports come at every poll of the runner: their chart is redrawn at most once
  // a second; state changes are applied at once.
  let progressTimer = null, lastProgress = 0;
  Object.keys(TOUCHES).forEach(function (kind) {
    es.addEventListener(kind, function (e) {
      let ev;
      try { ev = JSON.parse(e.data); } catch (_) { return; }
      if (kind === 'progress') {
        if (progressTimer) return;
        const wait = Math.max(0, 1000 - (Date.now() - lastProgress));
        progressTimer = setTimeout(function () {
          progressTimer = null; lastProgress = Date.now();
          TOUCHES.progress.forEach(function (n) { refresh(n, ev.wall_ms); });
        }, wait);
        return;
      }
      logEvent(ev);
      TOUCHES[kind].forEach(function (n) { refresh(n, ev.wall_ms); });
    });
  });
  es.addEventListener('lagged', function () { ALL.forEach(function (n) { refresh(n, 0); }); });

  // Running bars and the "now" line grow from the page's clock between events (no request).
  function grow() {
    const now = Date.now();
    document.querySelectorAll('svg.timeline').forEach(function (svg) {
      const t0 = Number(svg.dataset.t0Ms), x0 = Number(svg.dataset.x0), k = Number(svg.dataset.pxPerS);
      const right = svg.viewBox.baseVal.width - 2;
      svg.querySelectorAll('rect.real[data-running]').forEach(function (r) {
        const room = right - Number(r.getAttribute('x'));
        const w = Math.min(room, Math.max(2, (now - Number(r.dataset.startMs)) / 1000 * k));
        r.setAttribute('width', w.toFixed(1));
      });
      svg.querySelectorAll('line.now[data-running]').forEach(function (l) {
        const x = Math.min(right, x0 + (now - t0) / 1000 * k).toFixed(1);
        l.setAttribute('x1', x); l.setAttribute('x2', x);
      });
    });
  }
  setInterval(grow, 250);

  // Operator buttons: a first click arms (the label asks to confirm), a second within 5 s
  // sends. The armed button is remembered by its URL, so a view re-rendered by an event in
  // between keeps it armed. The answer is the API's own, refusals (403 for a viewer) included.
  let armed = null; // { url, until }
  function showArmed() {
    document.querySelectorAll('button[data-url]').forEach(function (b) {
      const on = armed && armed.url === b.dataset.url && Date.now() < armed.until;
      if (!b.dataset.label) b.dataset.label = b.textContent;
      if (on) { b.dataset.armed = '1'; b.textContent = 'Confirm: ' + b.dataset.label.toLowerCase() + '?'; b.title = b.dataset.confirm || ''; }
      else if (b.dataset.armed) { delete b.dataset.armed; b.textContent = b.dataset.label; }
    });
  }
  document.addEventListener('click', function (e) {
    const b = e.target.closest('button[data-url]');
    if (!b) return;
    const url = b.dataset.url;
    if (!armed || armed.url !== url || Date.now() >= armed.until) {
      armed = { url: url, until: Date.now() + 5000 };
      showArmed();
      setTimeout(showArmed, 5050);
      return;
    }
    armed = null;
    showArmed();
    const action = b.dataset.action;
    let body = b.dataset.body || '{}';
    if (b.dataset.input) {
      const mbps = Number((document.getElementById(b.dataset.input) || {}).value);
      if (!(mbps > 0)) { notice(action + ': type a cap in MB/s first', true); return; }
      body = JSON.stringify({ bytes_per_s: Math.round(mbps * 1e6) });
    }
    b.disabled = true;
    fetch(url, {
      method: 'POST', credentials: 'same-origin',
      headers: { 'Content-Type': 'application/json' }, body: body,
    })
      .then(function (r) {
        return r.text().then(function (t) {
          let msg = t;
          try { msg = JSON.parse(t).error || 'done'; } catch (_) { /* not JSON */ }
          if (r.ok) notice(action + ': done', false);
          else notice(action + ' refused (' + r.status + '): ' + msg, true);
        });
      })
      .catch(function (err) { notice(action + ' failed: ' + err.message, true); })
      .finally(function () { b.disabled = false; });
  });
})();
