"""URL filter on held-out URLs: spam, adult and gambling sites that are in none of the
shipped lists verbatim (new combinations of listed words, subdomains, other TLDs), and
ordinary URLs, including the classic false-positive traps of substring filters."""
import re

import pytest

from jaxllm.curate import url as U
from jaxllm.curate.config import UrlConfig

# Written before the lists in jaxllm/curate/lists/ and not tuned on them.
HELD_OUT_SPAM = [
    # pharma spam
    "https://free-viagra.biz/order", "http://www.free-viagra.net/", "https://free-viagra.co.uk/",
    "http://freeviagrasamples.info/", "https://buy-cheap-cialis-online.ru/",
    "http://cialisgenericpills.top/index.php", "https://shop.discountlevitra.cc/",
    "http://viagra-online-pharmacy.xyz/buy", "http://www.kamagra-shop24.eu/",
    "https://tramadol-no-prescription.org/", "http://xanaxwithoutprescription.net/",
    "https://bestonlinepharmacy.club/cheap-meds", "http://canadian-pharmacy-discount-pills.biz/",
    "http://phentermine-diet-pills.ws/", "https://valium-overnight-delivery.site/",
    # adult
    "https://hotmilfcams.live/", "http://www.xxxteenvids.net/", "https://freeporntube247.com/video/123",
    "http://pornstarzone.org/", "https://my.hentaihaven.tv/", "http://nudecelebsgallery.com/",
    "https://sexycamgirls.chat/", "http://livesexshows.net/", "https://amateur-porn-videos.co/",
    "http://www.bigtitsclips.net/", "https://milfhunter-free.tk/", "http://hardcorefuckvideos.org/",
    "http://camgirlsonline.ru/", "https://nakedwives.club/", "http://www.gayporntube.me/",
    "https://fetish-bondage-pics.com/", "https://sexchat-rooms.net/", "http://xhamsterlive.mirror.io/",
    "https://www.pornhub-premium.cc/", "https://de.xhamster.com/videos/x-1",
    "https://m.chaturbate.com/room", "https://es.pornhub.com/view_video", "https://xvideos.es/",
    "https://redtube.net.br/", "https://www.youporn.co.jp/", "https://nude-selfies.xxx/",
    "https://www.eroticstories.de/", "https://escort-girls-paris.fr/", "https://adult-webcams-live.org/",
    # gambling
    "https://best-casino-bonus.xyz/", "http://casinobonus247.net/", "https://slots-jackpot-online.com/free-spins",
    "https://royalvegascasino.co/", "https://play.luckyslots.bet/", "https://freespinscasino.io/",
    "https://online-poker-rooms.net/", "https://roulette-online-real-money.com/",
    "https://bingo-bonus-codes.win/", "https://www.megajackpotslots.org/",
    "https://pokerstars-free-chips.biz/", "https://blackjack-casino-online.eu/",
    "https://bet365-mirror.link/", "http://casino-en-ligne-france.fr/", "https://vulkan-casino.top/",
]

HELD_OUT_ORDINARY = [
    # substring traps
    "https://www.essex.ac.uk/courses", "https://www.sussex.ac.uk/", "https://en.wikipedia.org/wiki/Middlesex",
    "https://analytics.google.com/analytics/web/", "https://www.scunthorpe-united.co.uk/news",
    "https://www.psychologytoday.com/us/therapists", "https://therapist.com/find",
    "https://www.penisland.net/", "https://www.expertsexchange.com/", "https://www.whorepresents.com/",
    "https://www.therapistfinder.com/", "https://www.dickssportinggoods.com/", "https://www.cumbria.gov.uk/",
    "https://www.cocktail.com/recipes", "https://www.hotels.com/", "https://www.hotmail.com/",
    "https://www.cambridge.org/core", "https://www.logitech.com/en-us/products/webcams.html",
    "https://www.milford-ct.gov/", "https://www.shitake-farm.jp/", "https://www.assessment.gov.au/",
    "https://www.sextant-navigation.com/", "https://www.grapevine.com/", "https://www.cumulus.com/",
    "https://www.buttercup-bakery.com/", "https://www.titleist.com/", "https://www.hancock.gov/",
    "https://www.arsenal.com/", "https://www.classicfm.com/", "https://www.documents.com/",
    "https://www.bass-fishing.org/", "https://www.spermwhale.org/", "https://www.hotwheels.mattel.com/",
    "https://www.adultswim.com/", "https://www.camping.com/", "https://www.xxl-sports.no/",
    # news, reference, code, recipes, health
    "https://www.bbc.co.uk/news/world-12345", "https://www.nytimes.com/2024/01/01/science/space.html",
    "https://en.wikipedia.org/wiki/Casino_Royale_(novel)", "https://en.wikipedia.org/wiki/Poker",
    "https://en.wikipedia.org/wiki/Sex_Pistols", "https://en.wikipedia.org/wiki/Sexual_reproduction",
    "https://en.wikipedia.org/wiki/Las_Vegas", "https://en.wikipedia.org/wiki/Breast_cancer",
    "https://github.com/torvalds/linux", "https://github.com/huggingface/datatrove/issues/12",
    "https://stackoverflow.com/questions/123/how-to-parse-json",
    "https://www.allrecipes.com/recipe/12345/hot-and-sour-soup/",
    "https://www.bbcgoodfood.com/recipes/spicy-chicken-breast", "https://www.seriouseats.com/the-best-chili-recipe",
    "https://weather.com/weather/today/l/Essex", "https://www.nhs.uk/medicines/sildenafil/",
    "https://www.drugs.com/tramadol.html", "https://www.mayoclinic.org/drugs-supplements/tadalafil",
    "https://www.reuters.com/business/healthcare-pharmaceuticals/pfizer-results-2024-01-30/",
    "https://www.theguardian.com/society/gambling-addiction-support",
    "https://www.espn.com/nfl/story/_/id/1/sports-betting-law-explained",
    "https://www.britannica.com/topic/slot-machine", "https://www.bbc.com/sport/horse-racing",
    "https://www.cdc.gov/sexual-health/index.html", "https://kids.nationalgeographic.com/animals/birds/blue-tit",
    "https://www.rspb.org.uk/birds/great-tit", "https://docs.python.org/3/library/re.html",
    "https://www.hot-yoga-studio.com/schedule", "https://www.nasa.gov/missions/webb",
    "https://arxiv.org/abs/2406.17557", "https://www.imdb.com/title/tt0381061/",
    "https://www.amazon.com/dp/B000123/free-shipping", "https://www.cheapflights.com/",
    "https://www.bestbuy.com/site/laptops", "https://www.youtube.com/watch?v=abc",
]

# Written after the lists were adjusted on the sets above, and evaluated once, unchanged.
HELD_OUT_SPAM_B = [
    "https://generic-viagra-store.in/", "http://www.viagrabestprice.com/", "https://cialis-20mg-cheap.net/",
    "http://order-tramadol-overnight.us/", "https://adderall-online-shop.cc/", "http://pills-pharmacy-rx.biz/",
    "https://www.levitra-kaufen.de/", "https://kamagra-oral-jelly.co/", "http://cheap-xanax-pills.org/",
    "https://porn-hd-free.net/", "https://hot-sexy-babes.org/", "http://www.sexyteenscams.com/",
    "https://fr.xvideos.red/", "https://xhamster2.com/", "https://pornhubdeutsch.net/",
    "https://nude-girls-live.com/", "http://www.hardcore-sex-clips.biz/", "https://bigboobsgallery.net/",
    "https://hentai-manga-free.org/", "https://milf-tube-hd.com/", "https://www.gaysexvideos.tv/",
    "https://erotic-massage-girls.net/", "https://wildnakedgirls.com/", "https://live-sex-cams.tv/",
    "https://chaturbate.global/", "https://sexkontakte-berlin.de/", "https://pornovideos-gratis.es/",
    "https://best-online-casinos.org/", "https://casino-bonus-no-deposit.net/", "https://slotsmillion-casino.com/",
    "https://freebets-today.co.uk/", "https://poker-online-freeroll.net/", "https://www.bingo-jackpot-win.com/",
    "https://vegas-slots-free.net/", "https://live-roulette-casino.eu/", "https://www.betting-tips-odds.com/",
    "https://pokerstars.fr/", "https://unibet-casino.ro/", "https://1xbet-mirror.site/",
]
HELD_OUT_ORDINARY_B = [
    "https://www.sexton-family.org/", "https://www.essexlive.news/", "https://www.wessexwater.co.uk/",
    "https://www.analyticsvidhya.com/blog/", "https://www.therapistaid.com/", "https://www.cockburn.wa.gov.au/",
    "https://www.scunthorpetelegraph.co.uk/", "https://www.penistone-gs.uk/", "https://www.shittake.org/",
    "https://www.matchbox-cars.com/", "https://www.hotpot-recipes.com/", "https://www.bingley.gov.uk/",
    "https://www.pornography-research.org/", "https://www.casinoroyale-movie.com/", "https://www.pokemon.com/",
    "https://en.wikipedia.org/wiki/Breast", "https://en.wikipedia.org/wiki/Sexual_selection",
    "https://www.who.int/health-topics/sexual-health", "https://www.bbc.co.uk/news/uk-england-essex-1",
    "https://www.theatlantic.com/health/archive/2024/teen-girls-mental-health/",
    "https://www.allrecipes.com/recipe/1/chicken-breast-with-herbs/", "https://www.nhs.uk/conditions/breast-cancer/",
    "https://github.com/pytorch/pytorch/pull/1", "https://www.webmd.com/sex-relationships/guide/sexual-health",
    "https://www.gamblingcommission.gov.uk/", "https://www.begambleaware.org/", "https://www.lottery.co.uk/",
    "https://www.cambridge.org/sexuality-studies", "https://www.freecodecamp.org/news/", "https://www.bestbuy.ca/",
    "https://www.cheapoair.com/", "https://www.pharmacy-times.com/news", "https://www.livescience.com/animals",
    "https://www.hotjar.com/", "https://www.sexualhealth.nhs.uk/",
]

# Written after the lists were adjusted on sets A and B, evaluated once, unchanged.
HELD_OUT_SPAM_C = [
    "https://viagra-for-women.shop/", "http://www.cialisdaily-online.net/", "https://buy-valium-xanax.com/",
    "https://rx-meds-discount.org/", "https://oxycodone-no-rx.biz/", "https://tadalafil-cheap-pills.net/",
    "https://sexyasianbabes.net/", "https://naughty-cam-girls.com/", "https://xxx-movies-hd.org/",
    "https://www.porno-deutsch-gratis.de/", "https://m.youjizz.net/", "https://bongacams-free.org/",
    "https://nude-beach-pics.net/", "https://hot-lesbian-porn.tv/", "https://www.escortsinlondon.co.uk/",
    "https://hentaistream.cc/", "https://adultchat-rooms.org/", "https://fetishporn.club/",
    "https://casino-royal-slots.net/", "https://www.onlineroulette-win.com/", "https://top10casinos.online/",
    "https://pokeronline-bonus.net/", "https://bet-on-football-odds.win/", "https://betway-casino.co.za/",
    "https://superslots-jackpot.eu/",
]
HELD_OUT_ORDINARY_C = [
    "https://www.essexcricket.org.uk/", "https://www.sussexwildlifetrust.org.uk/", "https://www.googleanalytics.com/",
    "https://www.scunthorpeandlindsey.org/", "https://www.therapistsinlondon.co.uk/", "https://www.hotpoint.co.uk/",
    "https://www.cumberland.edu/", "https://www.middlesex.ac.uk/", "https://www.analysisfunction.gov.uk/",
    "https://www.assassinscreed.com/", "https://www.bassett-furniture.com/", "https://www.cockapoo-club.org/",
    "https://www.titmouse-society.org/", "https://en.wikipedia.org/wiki/Sexual_dimorphism",
    "https://en.wikipedia.org/wiki/Roulette", "https://en.wikipedia.org/wiki/Blackjack",
    "https://www.nature.com/articles/s41586-024-00001-1", "https://www.foodnetwork.com/recipes/hot-wings",
    "https://www.nhs.uk/medicines/tramadol/", "https://www.fda.gov/drugs/viagra-safety",
    "https://www.nytimes.com/2024/02/02/sports/betting-scandal.html", "https://www.sciencedaily.com/news/teen-health/",
    "https://www.hotdogrecipes.com/", "https://www.bigbangtheory.com/", "https://www.cambridgeshire.gov.uk/",
]

ALL_SPAM = HELD_OUT_SPAM + HELD_OUT_SPAM_B + HELD_OUT_SPAM_C


@pytest.fixture(scope="module")
def shipped():
    return U.UrlFilter(UrlConfig())


def _held_out_terms():
    """Hosts and compound host tokens of the spam set, to check they are not list entries."""
    for u in ALL_SPAM:
        host = U.host_of(u)
        yield host
        yield from (t for t in re.split(r"[^a-z0-9]+", host) if len(t) > 12)


def test_held_out_sets_are_not_in_the_lists_verbatim(shipped):
    for term in _held_out_terms():
        assert term not in shipped.domains, term
        assert term not in shipped.banned_words and term not in shipped.soft_words, term
        assert term not in shipped.banned_subwords, term


def _precision_recall(filt, spam, ordinary, name):
    removed_spam = [u for u in spam if filt.reason(u) is not None]
    removed_ok = [(u, filt.reason(u)) for u in ordinary if filt.reason(u) is not None]
    recall = len(removed_spam) / len(spam)
    precision = len(removed_spam) / max(len(removed_spam) + len(removed_ok), 1)
    print(f"URL filter, held-out set {name}: recall {recall:.3f} ({len(removed_spam)}/{len(spam)}), "
          f"precision {precision:.3f} ({len(removed_ok)} of {len(ordinary)} ordinary URLs removed: "
          f"{removed_ok}); missed {sorted(set(spam) - set(removed_spam))}")
    return precision, recall, removed_ok


SETS = {"A": (HELD_OUT_SPAM, HELD_OUT_ORDINARY), "B": (HELD_OUT_SPAM_B, HELD_OUT_ORDINARY_B),
        "C": (HELD_OUT_SPAM_C, HELD_OUT_ORDINARY_C)}


@pytest.mark.parametrize("name", sorted(SETS))
def test_shipped_filter_removes_held_out_spam_and_keeps_ordinary_urls(shipped, name):
    spam, ordinary = SETS[name]
    precision, recall, removed_ok = _precision_recall(shipped, spam, ordinary, name)
    assert precision >= 0.95, removed_ok
    assert recall >= 0.8
    if name in ("A", "B"):   # the sets the lists were adjusted on
        assert removed_ok == []


def test_a_hard_banned_word_removes_pages_about_it_too(shipped):
    """The price of datatrove's banned-word rule, kept here: set C's one false positive."""
    assert shipped.reason("https://www.fda.gov/drugs/viagra-safety") == "banned_word"
    assert shipped.reason("https://www.fda.gov/drugs/sildenafil-safety") is None   # soft alone


def test_without_the_shipped_lists_the_spam_passes():
    """The held-out recall comes from the shipped lists, not from the test's own URLs."""
    bare = U.UrlFilter(UrlConfig(use_default_lists=False))
    assert _precision_recall(bare, ALL_SPAM, [], "A+B+C, no lists")[1] == 0.0


def test_free_viagra_domains_are_removed_on_any_tld_and_subdomain(shipped):
    for u in ("http://free-viagra.com/", "https://www.free-viagra.org/a", "http://shop.free-viagra.info/",
              "https://free-viagra.de/", "https://freeviagra.pl/"):
        assert shipped.reason(u) is not None, u


@pytest.mark.parametrize("u", ["https://www.essex.ac.uk/", "https://www.sussex.ac.uk/research",
                               "https://analytics.example.com/", "https://www.scunthorpe.gov.uk/",
                               "https://therapist.com/", "https://www.therapists.org/find-a-therapist"])
def test_classic_substring_traps_are_kept(shipped, u):
    assert shipped.reason(u) is None
