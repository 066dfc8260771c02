// The kiln HTTP API from the browser: the key, fetch with `Authorization: Bearer`, errors as ApiError, and a
// Server-Sent Events reader over fetch() (EventSource cannot send an Authorization header).

const KEY = "kiln.apiKey";

export function getKey() {
  return sessionStorage.getItem(KEY) || localStorage.getItem(KEY) || "";
}

export function setKey(key, remember) {
  clearKey();
  (remember ? localStorage : sessionStorage).setItem(KEY, key);
}

export function clearKey() {
  sessionStorage.removeItem(KEY);
  localStorage.removeItem(KEY);
}

/** An answer that was not 2xx, with the server's {"error": {"code", "message", "details"}} unpacked. */
export class ApiError extends Error {
  constructor(status, code, message, details = null, headers = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.details = details;
    this.headers = headers;
  }
}

export const isAbort = (err) => err && (err.name === "AbortError" || err.name === "TimeoutError");

let unauthorized = () => {};
/** Called with the server's sentence whenever an answer is 401 (the app sends the user to sign in). */
export function onUnauthorized(handler) {
  unauthorized = handler;
}

async function toError(response) {
  let code = "http_" + response.status;
  let message = `${response.status} ${response.statusText || "error"} from ${new URL(response.url).pathname}`;
  let details = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      code = body.error.code || code;
      message = body.error.message || message;
      details = body.error.details ?? null;
    }
  } catch (err) {
    // Aborted while reading (the page moved on): not an answer to show anyone, least of all on the sign-in page.
    if (isAbort(err)) throw err;
    // not JSON: keep the status line
  }
  return new ApiError(response.status, code, message, details, response.headers);
}

/**
 * fetch() against this server with the key. Returns the parsed JSON (or the Response itself with raw: true).
 * Throws ApiError for any non-2xx; a 401 also calls the unauthorized handler unless quiet401 is set.
 * Options: method, json (a body to send as JSON), body, headers, signal, raw, key (instead of the stored one).
 */
export async function api(path, options = {}) {
  const { method = "GET", json, body, headers = {}, signal, raw = false, key, quiet401 = false } = options;
  const h = new Headers(headers);
  const token = key ?? getKey();
  if (token) h.set("Authorization", `Bearer ${token}`);
  let payload = body;
  if (json !== undefined) {
    h.set("Content-Type", "application/json");
    payload = JSON.stringify(json);
  }
  if (!h.has("Accept")) h.set("Accept", "application/json");
  let response;
  try {
    response = await fetch(path, { method, headers: h, body: payload, signal, cache: "no-store", credentials: "omit" });
  } catch (err) {
    if (isAbort(err)) throw err;
    throw new ApiError(0, "network_error", "The server cannot be reached; is kiln running?");
  }
  if (!response.ok) {
    const err = await toError(response);
    if (response.status === 401 && !quiet401 && !signal?.aborted) unauthorized(err.message);  // not a page left behind
    throw err;
  }
  if (raw) return response;
  if (response.status === 204) return null;
  return response.json();
}

/** A query string from an object; arrays repeat the key, null/undefined/"" are left out. */
export function qs(params) {
  const search = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    for (const item of Array.isArray(v) ? v : [v]) {
      if (item !== null && item !== undefined && item !== "") search.append(k, String(item));
    }
  }
  const s = search.toString();
  return s ? "?" + s : "";
}

/**
 * Reads one text/event-stream response until it ends. onEvent({type, data, id}) per event; returns
 * {lastEventId, retry} so the caller can reconnect with Last-Event-ID. Throws ApiError (404/405 when the
 * server has no such stream; 415 when it answered something else than an event stream).
 */
export async function readEvents(path, { lastEventId = null, signal, onEvent }) {
  const headers = { Accept: "text/event-stream" };
  if (lastEventId !== null && lastEventId !== "") headers["Last-Event-ID"] = lastEventId;
  const response = await api(path, { raw: true, headers, signal });
  const type = response.headers.get("Content-Type") || "";
  if (!type.startsWith("text/event-stream")) {
    await response.body?.cancel();
    throw new ApiError(415, "not_an_event_stream", `${path} did not answer with an event stream.`);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  let event = "";
  let id = lastEventId;
  let retry = null;
  const dispatch = () => {
    if (data.length) onEvent({ type: event || "message", data: data.join("\n"), id });
    data = [];
    event = "";
  };
  const line = (text) => {
    if (text === "") return dispatch();
    if (text.startsWith(":")) return; // a comment (keep-alive)
    const colon = text.indexOf(":");
    const field = colon < 0 ? text : text.slice(0, colon);
    let value = colon < 0 ? "" : text.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") data.push(value);
    else if (field === "event") event = value;
    else if (field === "id" && !value.includes("\0")) id = value;
    else if (field === "retry" && /^\d+$/.test(value)) retry = Number(value);
  };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      // Lines end in \n, \r\n or \r; a \r at the very end may be the first half of \r\n: wait for more.
      let match;
      const re = /\r\n|\n|\r(?!$)/g;
      let start = 0;
      while ((match = re.exec(buffer)) !== null) {
        line(buffer.slice(start, match.index));
        start = match.index + match[0].length;
      }
      buffer = buffer.slice(start);
    }
  } finally {
    reader.releaseLock();
  }
  // A stream that ends mid-event drops that event, as EventSource does.
  return { lastEventId: id, retry };
}
