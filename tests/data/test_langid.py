"""Language id: hand-written sentences in the report's languages, real translated strings from the
machine's gettext catalogs, script rules for CJK and South-East Asian scripts, and no-letter text."""

import gettext
from pathlib import Path

import pytest

from qwen2.data.langid import REPORT_LANGUAGES, identify, script_counts

SAMPLES = {
    "en": "The old lighthouse keeper climbed the stairs every evening to light the lamp for the ships.",
    "zh": "老灯塔看守人每天晚上都会爬上楼梯，为过往的船只点亮灯塔。",
    "es": "El viejo farero subía las escaleras cada tarde para encender la lámpara para los barcos.",
    "fr": "Le vieux gardien du phare montait l'escalier chaque soir pour allumer la lampe des navires.",
    "de": "Der alte Leuchtturmwärter stieg jeden Abend die Treppe hinauf, um die Lampe für die Schiffe anzuzünden.",
    "ar": "كان حارس المنارة العجوز يصعد الدرج كل مساء ليضيء المصباح للسفن.",
    "ru": "Старый смотритель маяка каждый вечер поднимался по лестнице, чтобы зажечь лампу для кораблей.",
    "ko": "늙은 등대지기는 매일 저녁 배들을 위해 등불을 켜려고 계단을 올라갔다.",
    "ja": "年老いた灯台守は毎晩、船のために灯りをともそうと階段を上った。",
    "th": "ผู้ดูแลประภาคารชราปีนบันไดทุกเย็นเพื่อจุดตะเกียงให้เรือ",
    "vi": "Người gác hải đăng già leo cầu thang mỗi tối để thắp đèn cho những con tàu.",
    "pt": "O velho faroleiro subia as escadas todas as noites para acender a lâmpada para os navios.",
    "it": "Il vecchio guardiano del faro saliva le scale ogni sera per accendere la lampada per le navi.",
    "nl": "De oude vuurtorenwachter beklom elke avond de trap om de lamp voor de schepen aan te steken.",
    "pl": "Stary latarnik każdego wieczoru wspinał się po schodach, aby zapalić lampę dla statków.",
    "tr": "Yaşlı deniz feneri bekçisi gemiler için lambayı yakmak üzere her akşam merdivenleri tırmanırdı.",
    "he": "שומר המגדלור הזקן טיפס במדרגות בכל ערב כדי להדליק את המנורה בשביל הספינות.",
    "hi": "बूढ़ा प्रकाशस्तंभ रक्षक हर शाम जहाजों के लिए दीपक जलाने सीढ़ियाँ चढ़ता था।",
    "uk": "Старий доглядач маяка щовечора піднімався сходами, щоб запалити лампу для кораблів.",
    "el": "Ο γέρος φαροφύλακας ανέβαινε τις σκάλες κάθε βράδυ για να ανάψει τη λάμπα για τα πλοία.",
    "sv": "Den gamle fyrvaktaren gick uppför trappan varje kväll för att tända lampan åt skeppen.",
    "fi": "Vanha majakanvartija kiipesi portaat joka ilta sytyttääkseen lampun laivoille.",
    "hu": "Az öreg világítótorony-őr minden este felmászott a lépcsőn, hogy meggyújtsa a lámpát a hajóknak.",
    "lo": "ຜູ້ເຝົ້າປະພາຄານຜູ້ເຖົ້າປີນຂັ້ນໄດທຸກໆແລງເພື່ອຈູດໂຄມໄຟໃຫ້ເຮືອ",
    "km": "អ្នកយាមប៉មភ្លើងចាស់ឡើងជណ្ដើររៀងរាល់ល្ងាច ដើម្បីអុជចង្កៀងឲ្យកប៉ាល់។",
    "my": "အိုမင်းသော မီးပြတိုက်စောင့်သည် သင်္ဘောများအတွက် မီးထွန်းရန် ညနေတိုင်း လှေကားတက်သည်။",
}


@pytest.mark.parametrize("lang", sorted(SAMPLES))
def test_hand_written_sentences(lang):
    guess = identify(SAMPLES[lang])
    assert guess.lang == lang, guess
    assert 0 < guess.confidence <= 1


def test_scripts_decide_cjk_and_south_east_asian_text():
    assert script_counts("漢字とかなカナ") == {"Han": 2, "Kana": 5}
    kanji_heavy = "東京都千代田区永田町一丁目七番一号に国会議事堂がある。"  # a little kana among many kanji
    assert identify(kanji_heavy).lang == "ja"
    assert identify("北京是中华人民共和国的首都。").lang == "zh"
    assert identify(SAMPLES["ko"]).script == "Hangul"


def test_text_without_letters_is_undetermined():
    for text in ("", "   ", "12345 67.89 -- +++ ###", "😀😀😀"):
        guess = identify(text)
        assert (guess.lang, guess.confidence, guess.script) == ("und", 0.0, "none")


def _catalog_text(lang: str, limit: int = 1500) -> str | None:
    """Real translated strings for `lang` from the machine's gettext catalogs (Debian ships them);
    for English, the catalogs' source strings (the msgids of the French ones)."""
    folder = Path("/usr/share/locale") / {"zh": "zh_CN", "en": "fr"}.get(lang, lang) / "LC_MESSAGES"
    if not folder.is_dir():
        return None
    parts: list[str] = []
    for mo in sorted(folder.glob("*.mo")):
        try:
            with mo.open("rb") as f:
                catalog = gettext.GNUTranslations(f)
        except (OSError, UnicodeDecodeError):
            continue
        for msgid, msgstr in catalog._catalog.items():
            if not msgid or not isinstance(msgid, str):  # the header, plural forms
                continue
            text = msgid if lang == "en" else msgstr
            if isinstance(text, str) and len(text) > 20 and "%" not in text:
                parts.append(text)
            if sum(map(len, parts)) > limit:
                return "\n".join(parts)
    return "\n".join(parts) if parts else None


def test_real_translations_from_gettext_catalogs():
    found, wrong = 0, []
    for lang in REPORT_LANGUAGES:
        text = _catalog_text(lang)
        if text is None or len(text) < 300:
            continue
        found += 1
        guess = identify(text)
        if guess.lang != lang and not (lang == "ms" and guess.lang == "id"):  # Malay and Indonesian are close
            wrong.append((lang, guess))
    if found == 0:
        pytest.skip("no gettext catalogs on this machine (/usr/share/locale)")
    assert found >= 20 and not wrong, (found, wrong)
