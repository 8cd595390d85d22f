// The dashboard's few behaviours that htmx attributes could only express with eval, which the page's CSP forbids.
(() => {
  // Refresh only while the tab is visible: a hidden tab skips its timed polls and refreshes once on return.
  const polled = ["streams", "charts"];
  document.addEventListener("htmx:beforeRequest", (event) => {
    if (document.hidden && polled.includes(event.detail.elt.id)) event.preventDefault();
  });
  document.addEventListener("visibilitychange", () => {
    if (document.hidden) return;
    for (const id of polled) {
      const element = document.getElementById(id);
      if (element) htmx.trigger(element, "refresh");
    }
  });

  // A refresh that lands while the operator is selecting text in the table (to copy an id, say) or
  // pressing a button in it would undo the selection or swallow the click: skip it; the next one comes.
  let pressed = false;
  document.addEventListener("pointerdown", () => { pressed = true; });
  document.addEventListener("pointerup", () => { pressed = false; });
  document.addEventListener("pointercancel", () => { pressed = false; });
  document.addEventListener("htmx:beforeSwap", (event) => {
    const target = event.detail.target;
    if (target.id !== "streams") return;
    const selection = document.getSelection();
    const selecting = selection && !selection.isCollapsed && target.contains(selection.anchorNode);
    if (selecting || (pressed && target.matches(":hover"))) event.detail.shouldSwap = false;
  });

  // htmx leaves the page untouched when an answer is an error or never comes: say so, and clear the
  // message once a later request (such as the next refresh) succeeds.
  const say = (text) => {
    const toast = document.getElementById("toast");
    if (!toast) return;
    toast.textContent = text;
    toast.hidden = !text;
  };
  document.addEventListener("htmx:responseError", (event) => {
    const xhr = event.detail.xhr;
    say(xhr.responseText.slice(0, 300) || `The server answered ${xhr.status}.`);
  });
  document.addEventListener("htmx:sendError", () => say("The server is not answering; retrying…"));
  document.addEventListener("htmx:afterRequest", (event) => {
    if (event.detail.successful) say("");
  });
})();
