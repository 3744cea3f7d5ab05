// Test driver: open the page in headless Chromium (Debian's package; puppeteer-core downloads no
// browser) and print the results JSON it computes. Usage: node run_page.mjs URL CHROMIUM_PATH
import puppeteer from 'puppeteer-core';

const [url, executablePath] = process.argv.slice(2);
const browser = await puppeteer.launch({
  executablePath, headless: true, args: ['--no-sandbox', '--disable-gpu'],
});
try {
  const page = await browser.newPage();
  page.on('console', (msg) => console.error(`page: ${msg.text()}`));
  await page.goto(url);
  await page.waitForFunction(() => ['done', 'error'].includes(document.title), { timeout: 120000 });
  const title = await page.title();
  if (title !== 'done') {
    throw new Error(await page.$eval('#status', (el) => el.textContent));
  }
  console.log(await page.$eval('#results', (el) => el.textContent));
} finally {
  await browser.close();
}
