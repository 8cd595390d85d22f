/* The viewer's Stop button: asks the stream's writer to stop (POST /stream/{id}/stop), and hides itself
   once the page shows the stream closed or gone. Apart from watch.js, which only follows the stream. */
(() => {
  "use strict";

  const button = document.getElementById("stop");
  const root = document.getElementById("watch");
  if (!button || !root) return;
  const label = button.textContent;

  const sync = () => {
    button.hidden = root.dataset.state === "closed" || root.dataset.state === "gone";
  };
  new MutationObserver(sync).observe(root, { attributes: true, attributeFilter: ["data-state"] });
  sync();

  button.addEventListener("click", async () => {
    button.disabled = true;
    button.textContent = "Stopping…";
    try {
      const response = await fetch(`/stream/${encodeURIComponent(button.dataset.stream)}/stop`, {
        method: "POST",
        headers: { "x-csrf-token": button.dataset.csrf || "" },
        credentials: "same-origin",
        cache: "no-store",
      });
      if (!response.ok) {
        const text = await response.text();
        throw new Error(text || `the server answered ${response.status}`);
      }
      // The writer closes the stream when it stops; the live connection then shows it closed.
      button.title = "Asked the writer to stop";
    } catch (error) {
      button.disabled = false;
      button.textContent = label;
      button.title = `Could not stop the stream: ${error.message}`;
    }
  });
})();
