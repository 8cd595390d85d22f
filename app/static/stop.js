/* The viewer's Stop button: the same control as <streamhold-stream stop> (streamhold.js), shown while the
   page may stop the stream and it is open; it asks the writer to stop with the page's CSRF token. Apart
   from watch.js, which only follows the stream. */
import { stopControl } from "./streamhold.js";

const button = document.getElementById("stop");
const root = document.getElementById("watch");
if (button && root) {
  const src = `${location.origin}/stream/${encodeURIComponent(button.dataset.stream)}${location.search}`;
  stopControl(button, root, src, { csrf: button.dataset.csrf || "" });
}
