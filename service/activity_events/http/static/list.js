// The list page: deployments, newest activity first, kept current by /api/stream.
"use strict";

(() => {
  const tbody = document.querySelector("#deployments tbody");
  const empty = document.getElementById("empty");
  const summary = document.getElementById("summary");
  const rows = new Map(); // deployment id -> {row, cursor, count}
  const pending = new Map(); // deployment id -> events seen while its row is being fetched
  let total = 0;

  function render(state, data) {
    const row = state.row;
    row.replaceChildren();
    const link = document.createElement("a");
    link.href = "/deployments/" + data.id;
    link.textContent = "Deployment " + data.id;
    Activity.cell(row, "Deployment", link);
    Activity.cell(row, "Events", String(state.count), "num");
    Activity.cell(row, "Last event", Activity.timeElement(data.last ? data.last.receive : null));
    Activity.cell(row, "Most recent message", data.last ? data.last.message : "", "message");
  }

  function upsert(data) {
    let state = rows.get(data.id);
    if (!state) {
      state = { row: document.createElement("tr"), cursor: null, count: 0 };
      state.row.dataset.deployment = String(data.id);
      rows.set(data.id, state);
    }
    state.count = data.event_count;
    state.cursor = data.last ? data.last.cursor : null;
    state.last = data.last;
    render(state, data);
    return state;
  }

  function moveToTop(state) {
    tbody.prepend(state.row);
    state.row.classList.remove("fresh");
    void state.row.offsetWidth; // restart the highlight
    state.row.classList.add("fresh");
  }

  function showCounts() {
    empty.hidden = rows.size > 0;
    summary.textContent = rows.size
      ? (rows.size < total ? "Showing the " + rows.size + " most recently active of " + total + " deployments." : total + (total === 1 ? " deployment." : " deployments."))
      : "";
  }

  function snapshot(data) {
    rows.clear();
    tbody.replaceChildren();
    total = data.total;
    for (const item of data.deployments) tbody.append(upsert(item).row);
    showCounts();
  }

  function apply(event) {
    const state = rows.get(event.deployment_id);
    if (!state) {
      fetchRow(event);
      return;
    }
    if (state.cursor && Activity.compareCursors(event.cursor, state.cursor) <= 0) return;
    state.cursor = event.cursor;
    state.count += 1;
    render(state, { id: event.deployment_id, last: event });
    moveToTop(state);
  }

  async function fetchRow(event) {
    const id = event.deployment_id;
    if (pending.has(id)) {
      pending.get(id).push(event);
      return;
    }
    pending.set(id, [event]);
    try {
      const data = await Activity.api("/api/deployments/" + id);
      if (!rows.has(id)) {
        total += 1;
        moveToTop(upsert(data));
      }
    } catch (error) {
      // The deployment may be gone again; its next event tries once more.
    }
    const waiting = pending.get(id) || [];
    pending.delete(id);
    if (rows.has(id)) waiting.forEach(apply);
    showCounts();
  }

  Activity.withSignIn(() => Activity.api("/api/deployments?limit=1"))
    .then(() => {
      Activity.liveStream(() => "/api/stream", {
        snapshot,
        event: (event) => {
          apply(event);
          showCounts();
        },
      });
    })
    .catch((error) => Activity.setStatus("Error: " + error.message, "error"));
})();
