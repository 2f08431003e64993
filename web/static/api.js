// The HTTP API as the pages use it: same origin, the session cookie, the CSRF header on state changes.

let csrf = null;

// crypto.randomUUID exists only in secure contexts (HTTPS, localhost); getRandomValues everywhere.
export function newKey() {
  return [...crypto.getRandomValues(new Uint8Array(16))].map((b) => b.toString(16).padStart(2, "0")).join("");
}

export class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

function setCsrf(session) {
  csrf = session && session.csrf_token ? { header: session.csrf_header, token: session.csrf_token } : null;
}

export function headers(extra = {}) {
  const h = { Accept: "application/json", ...extra };
  if (csrf) h[csrf.header] = csrf.token;
  return h;
}

async function problemOf(response) {
  try {
    return await response.json();
  } catch {
    return { title: response.statusText || "Error", status: response.status, detail: `The server answered ${response.status}.` };
  }
}

export async function api(method, path, body, extraHeaders = {}) {
  const init = { method, headers: headers(extraHeaders), credentials: "same-origin" };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    throw new ApiError(0, { title: "Network error", detail: `The server could not be reached (${error.message}). Try again.` });
  }
  // A session that ended (signed out elsewhere, keys changed): the app goes back to its sign-in page.
  if (response.status === 401 && path !== "/v1/session") window.dispatchEvent(new CustomEvent("unauthorized"));
  if (!response.ok) throw new ApiError(response.status, await problemOf(response));
  if (response.status === 204) return null;
  return response.json();
}

// One XMLHttpRequest: fetch() cannot report upload progress.
export function send(method, url, body, { onProgress, headers: h = {}, withApiHeaders = true } = {}) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open(method, url);
    for (const [k, v] of Object.entries(withApiHeaders ? headers(h) : h)) xhr.setRequestHeader(k, v);
    if (onProgress) xhr.upload.onprogress = (e) => onProgress(e.loaded);
    xhr.onerror = () => reject(new ApiError(0, { title: "Network error", detail: "The upload was interrupted. Try again." }));
    xhr.onload = () => {
      let data = null;
      try { data = xhr.responseText ? JSON.parse(xhr.responseText) : null; } catch { data = null; }
      if (xhr.status >= 200 && xhr.status < 300) resolve({ data, xhr });
      else {
        if (xhr.status === 401) window.dispatchEvent(new CustomEvent("unauthorized"));
        reject(new ApiError(xhr.status, data || { title: `HTTP ${xhr.status}`, detail: xhr.statusText }));
      }
    };
    xhr.send(body);
  });
}

// Direct to S3 (presigned multipart, /v1/uploads) for files of at least one part, as the server's session says;
// streamed through the API otherwise, or when the server keeps artifacts in a local directory.
let directUploadMinBytes = null;

export function setSession(session) {
  setCsrf(session);
  directUploadMinBytes = session ? session.direct_upload_min_bytes : null;
}

export async function uploadFile(kind, file, onProgress) {
  const plural = kind === "checkpoint" ? "checkpoints" : "datasets";
  const key = newKey();
  if (directUploadMinBytes && file.size >= directUploadMinBytes) {
    let upload = null;
    try {
      upload = await api("POST", "/v1/uploads", { kind, name: file.name, size_bytes: file.size }, { "Idempotency-Key": key });
    } catch (error) {
      if (error.status !== 409) throw error;
    }
    if (upload) {
      const done = new Array(upload.parts.length).fill(0);
      const parts = [];
      for (const part of upload.parts) {
        const { xhr } = await send("PUT", part.url, file.slice(part.offset, part.offset + part.size_bytes), {
          withApiHeaders: false,
          onProgress: (n) => { done[part.part_number - 1] = n; onProgress(done.reduce((a, b) => a + b, 0)); },
        });
        parts.push({ part_number: part.part_number, etag: xhr.getResponseHeader("ETag") });
      }
      return api("POST", `/v1/uploads/${encodeURIComponent(upload.id)}/complete`, { parts });
    }
  }
  const form = new FormData();
  form.append("file", file, file.name);
  const { data } = await send("POST", `/v1/${plural}`, form, { onProgress, headers: { "Idempotency-Key": key } });
  return data;
}
