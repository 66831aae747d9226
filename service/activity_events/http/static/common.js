// Shared by the activity pages: API calls with the reader token, live streams that
// resume, cursor order and time display. Data is only ever put into the page with
// textContent and attributes, never as HTML.
"use strict";

const Activity = (() => {
  const TOKEN_KEY = "activity-events.token";
  const MAX_RETRY_MS = 30000;

  class AuthError extends Error {
    constructor(message, status) {
      super(message);
      this.status = status;
    }
  }

  function token() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  }

  async function api(path) {
    const headers = { Accept: "application/json" };
    const current = token();
    if (current) headers.Authorization = "Bearer " + current;
    const response = await fetch(path, { headers, cache: "no-store" });
    const body = await response.json().catch(() => ({}));
    if (response.status === 401 || response.status === 403) {
      throw new AuthError(body.error || response.statusText, response.status);
    }
    if (!response.ok) {
      const error = new Error(body.error || response.statusText);
      error.status = response.status;
      throw error;
    }
    return body;
  }

  function setStatus(text, state) {
    const status = document.getElementById("status");
    status.textContent = text;
    status.dataset.state = state;
  }

  // Shows the sign-in form; resolves once a token was entered.
  function signIn(reason) {
    const form = document.getElementById("login");
    const input = document.getElementById("token");
    const error = document.getElementById("login-error");
    setStatus("Sign-in needed", "error");
    error.textContent = token() ? "That token was refused (" + reason + ")." : "";
    sessionStorage.removeItem(TOKEN_KEY);
    form.hidden = false;
    input.focus();
    return new Promise((resolve) => {
      form.addEventListener("submit", function submitted(event) {
        event.preventDefault();
        const value = input.value.trim();
        if (!value) return;
        sessionStorage.setItem(TOKEN_KEY, value);
        input.value = "";
        form.hidden = true;
        form.removeEventListener("submit", submitted);
        resolve();
      });
    });
  }

  // Runs `load` (which calls api()); on a refused token asks for one and tries again.
  async function withSignIn(load) {
    for (;;) {
      try {
        return await load();
      } catch (error) {
        if (!(error instanceof AuthError)) throw error;
        await signIn(error.message);
      }
    }
  }

  // An EventSource that keeps going: the browser itself reconnects after a dropped
  // connection (sending Last-Event-ID); when it gives up (an HTTP error, e.g. the
  // stream limit), we reconnect with backoff from `url()`, which carries our cursor.
  function liveStream(url, handlers) {
    let source = null;
    let delay = 1000;
    let timer = null;
    const connect = () => {
      timer = null;
      const target = new URL(url(), location.origin);
      if (token()) target.searchParams.set("access_token", token());
      source = new EventSource(target);
      source.addEventListener("open", () => {
        delay = 1000;
        setStatus("Live", "live");
      });
      for (const [name, handle] of Object.entries(handlers)) {
        source.addEventListener(name, (message) => handle(JSON.parse(message.data)));
      }
      source.addEventListener("error", () => {
        if (source.readyState !== EventSource.CLOSED) {
          setStatus("Reconnecting…", "connecting");
          return;
        }
        setStatus("Disconnected; retrying…", "error");
        timer = setTimeout(async () => {
          try {
            await withSignIn(() => api("/api/deployments?limit=1"));
          } catch (error) {
            // store unavailable: try the stream again anyway
          }
          connect();
        }, delay);
        delay = Math.min(delay * 2, MAX_RETRY_MS);
      });
    };
    connect();
    return {
      stop() {
        if (source) source.close();
        if (timer) clearTimeout(timer);
        timer = null;
      },
      restart() {
        this.stop();
        connect();
      },
    };
  }

  // Cursors "<deployment>:<ms>-<seq>" of one deployment, compared by entry id.
  function cursorKey(cursor) {
    const entry = cursor.slice(cursor.indexOf(":") + 1);
    const [ms, seq] = entry.split("-");
    return [BigInt(ms), BigInt(seq)];
  }

  function compareCursors(a, b) {
    const [am, as] = cursorKey(a);
    const [bm, bs] = cursorKey(b);
    if (am !== bm) return am < bm ? -1 : 1;
    if (as !== bs) return as < bs ? -1 : 1;
    return 0;
  }

  const pad = (value, width) => String(value).padStart(width, "0");

  // "2026-11-29 14:03:07.123456789 +01:00" in the viewer's time zone.
  function exactTime(ns) {
    const big = BigInt(ns);
    const date = new Date(Number(big / 1000000n));
    const offset = -date.getTimezoneOffset();
    const sign = offset >= 0 ? "+" : "-";
    const zone = sign + pad(Math.floor(Math.abs(offset) / 60), 2) + ":" + pad(Math.abs(offset) % 60, 2);
    return (
      date.getFullYear() + "-" + pad(date.getMonth() + 1, 2) + "-" + pad(date.getDate(), 2) + " " +
      pad(date.getHours(), 2) + ":" + pad(date.getMinutes(), 2) + ":" + pad(date.getSeconds(), 2) +
      "." + pad(big % 1000000000n, 9) + " " + zone
    );
  }

  // A <time> in local time; hovering (or the title) gives the exact timestamp.
  function timeElement(ns) {
    const element = document.createElement("time");
    if (!ns || ns === "0") {
      element.textContent = "—";
      return element;
    }
    const date = new Date(Number(BigInt(ns) / 1000000n));
    element.dateTime = date.toISOString();
    element.textContent = date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "medium" });
    element.title = exactTime(ns) + " (" + ns + " ns since the epoch)";
    return element;
  }

  function cell(row, label, content, className) {
    const td = document.createElement("td");
    td.dataset.label = label;
    if (className) td.className = className;
    if (content instanceof Node) td.append(content);
    else td.textContent = content;
    row.append(td);
    return td;
  }

  return { AuthError, api, withSignIn, liveStream, compareCursors, timeElement, exactTime, cell, setStatus };
})();
