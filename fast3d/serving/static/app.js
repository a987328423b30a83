// The upload page: POST the chosen images to /v1/reconstruct (multipart, turntable on, JSON answer),
// then show the turntable GIF, the interactive viewer (viewer.js, on the .splat copy the answer
// carries), a download link for the PLY/.splat and the per-stage latencies.
"use strict";

const $ = (id) => document.getElementById(id);

function bytesFromBase64(b64) {
  const bin = atob(b64);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

async function describe() {
  const r = await fetch("/readyz");
  if (!r.ok) { $("model").textContent = `Server not ready (${r.status}).`; return; }
  const d = await r.json();
  $("model").textContent = `Model: ${d.model}, ${d.images} image(s) a request, on ${d.device}.`;
}

async function reconstruct(event) {
  event.preventDefault();
  const status = $("status");
  status.className = "";
  status.textContent = "Reconstructing…";
  $("result").hidden = true;
  const form = new FormData();
  for (const f of $("images").files) form.append("images", f, f.name);
  form.append("format", $("format").value);
  form.append("turntable", "true");
  form.append("viewer", "true");
  const headers = { "Accept": "application/json" };
  if ($("key").value) headers["Authorization"] = `Bearer ${$("key").value}`;
  const r = await fetch("/v1/reconstruct", { method: "POST", body: form, headers });
  const text = await r.text();
  let d;
  try { d = JSON.parse(text); } catch { d = { error: { field: null, message: text } }; }
  if (!r.ok) {
    status.className = "error";
    const e = d.error || {};
    status.textContent = `Error ${r.status}${e.field ? " in " + e.field : ""}: ${e.message}`;
    return;
  }
  $("turntable").src = `data:image/gif;base64,${d.turntable_gif_base64}`;
  const blob = new Blob([bytesFromBase64(d.data_base64)], { type: "application/octet-stream" });
  const link = $("download");
  link.href = URL.createObjectURL(blob);
  link.download = d.model === "lgm" && d.format === "ply" ? "gaussians.ply" : `${d.model}.${d.format}`;
  link.textContent = `Download ${link.download} (${d.bytes} bytes)`;
  const body = $("latency").tBodies[0];
  body.replaceChildren(...Object.entries(d.latency_ms).map(([k, v]) => {
    const tr = document.createElement("tr");
    const th = document.createElement("th");
    const td = document.createElement("td");
    th.textContent = k;
    td.textContent = v.toFixed(1);
    tr.append(th, td);
    return tr;
  }));
  $("result").hidden = false;
  if (window.fast3dViewer) window.fast3dViewer.show(bytesFromBase64(d.splat_base64));
  else $("viewer-status").textContent = "The viewer did not load.";
  status.textContent = `Done: batch of ${d.batch_size}.`;
}

$("upload").addEventListener("submit", reconstruct);
describe();
