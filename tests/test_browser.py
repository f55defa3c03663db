"""The `ban serve` page in a real headless Chromium (Debian's chromium + chromedriver, driven by
selenium; nothing is downloaded at run time). Skips, saying why, where any of them is missing."""

import shutil
import threading

import pytest

from ban import serve
from tests.viz_run import first_question, tiny_viz_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (pip install selenium)"
)
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip(
        "chromium or chromedriver not found (apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    run, data = tiny_viz_run(tmp_path_factory)
    httpd = serve.make_server(serve.load_app(run, data), "127.0.0.1", 0, quiet=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd, data
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1200,900"]:  # fmt: skip
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    try:
        driver = webdriver.Chrome(options=options, service=service)
    except Exception as error:  # a broken install: say so rather than fail the suite
        pytest.skip(f"chromium could not start: {str(error).splitlines()[0]}")
    yield driver
    driver.quit()


def test_ask_a_question_and_see_the_attention(server, browser):
    httpd, data = server
    host, port = httpd.server_address[:2]
    browser.get(f"http://{host}:{port}/")
    wait = WebDriverWait(browser, 20)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#thumbs img")) > 0)
    entry = first_question(data)
    thumb = browser.find_element(
        By.CSS_SELECTOR, f"#thumbs img[data-image-id='{entry['image_id']}']"
    )
    thumb.click()
    # the picture is on the canvas, with no boxes yet
    painted = (
        "const c = document.getElementById('canvas'); return c.width > 16 && "
        "c.getContext('2d').getImageData(c.width / 2, c.height / 2, 1, 1).data[3] > 0;"
    )
    wait.until(lambda d: d.execute_script(painted))
    before = browser.execute_script("return document.getElementById('canvas').toDataURL();")
    assert browser.find_element(By.ID, "canvas").get_attribute("data-boxes") == "0"

    browser.find_element(By.ID, "question").send_keys(entry["question"])
    browser.find_element(By.ID, "submit").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#answers li")) > 0)

    answers = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#answers .answer")]
    scores = [float(e.text) for e in browser.find_elements(By.CSS_SELECTOR, "#answers .score")]
    assert len(answers) == 5 and all(answers) and scores == sorted(scores, reverse=True)
    assert "read as:" in browser.find_element(By.ID, "tokens").text
    canvas = browser.find_element(By.ID, "canvas")
    assert int(canvas.get_attribute("data-boxes")) == 2 * 3  # 2 glimpses x 3 boxes
    after = browser.execute_script("return document.getElementById('canvas').toDataURL();")
    assert after != before  # the overlay was drawn over the picture
    assert browser.find_element(By.ID, "status").text == ""

    # a bad question shows the server's message and keeps the page working
    browser.find_element(By.ID, "question").clear()
    browser.find_element(By.ID, "question").send_keys("   ")
    browser.find_element(By.ID, "submit").click()
    wait.until(lambda d: d.find_element(By.ID, "status").text != "")
    assert "empty" in browser.find_element(By.ID, "status").text
