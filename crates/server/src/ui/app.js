// factline web UI: the live tail. Subscribes to the API's SSE endpoint named by the table's
// data-source and adds each event as a row at the top. Values are written with textContent
// only, never as HTML. EventSource reconnects by itself and resumes with Last-Event-ID.
"use strict";
(function () {
  const table = document.getElementById("tail");
  if (!table) return;
  const body = table.querySelector("tbody");
  const status = document.getElementById("tail-status");
  const count = document.getElementById("tail-count");
  const rowsMax = 500;
  // data-limit: stop after this many events (the page's ?limit=N); 0 follows forever.
  const limit = Number(table.dataset.limit || "0");
  let received = 0;
  const cell = (row, text, className) => {
    const td = row.insertCell();
    td.textContent = text;
    if (className) td.className = className;
    return td;
  };
  const source = new EventSource(table.dataset.source);
  source.onopen = () => { status.textContent = "live"; };
  source.onerror = () => { status.textContent = "reconnecting…"; };
  source.addEventListener("error", (message) => {
    if (message.data) status.textContent = "ended: " + message.data;
  });
  source.onmessage = (message) => {
    const event = JSON.parse(message.data);
    const row = body.insertRow(0);
    row.className = "fresh";
    cell(row, String(event.position), "num");
    cell(row, event.stream);
    cell(row, String(event.revision), "num");
    cell(row, event.type);
    cell(row, event.recorded_at, "time");
    const pre = document.createElement("pre");
    pre.textContent = event.data_base64 !== undefined
      ? "<binary, base64> " + event.data_base64
      : JSON.stringify(event.data, null, 2);
    row.insertCell().appendChild(pre);
    received += 1;
    count.textContent = String(received);
    while (body.rows.length > rowsMax) body.deleteRow(body.rows.length - 1);
    if (limit > 0 && received >= limit) {
      source.close();
      status.textContent = "stopped after " + received + " events";
    }
  };
})();
