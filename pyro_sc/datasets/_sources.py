"""Where each real data set comes from: its public original files (pinned URL, sha256, size, license).

A data set is converted from its originals by the function of the same name in ``_convert.py``. The
marker lists of the CellAssign paper are fetched the same way, from the paper's repository at a pinned
commit (that repository carries no license file, so the lists are not copied into this package).
"""

from __future__ import annotations

from dataclasses import dataclass

_GITHUB = "https://raw.githubusercontent.com"


@dataclass(frozen=True)
class Original:
    """One public file: its name, URL at a pinned commit, sha256 and size in bytes."""

    name: str
    url: str
    sha256: str
    size: int


@dataclass(frozen=True)
class DataSet:
    """A real data set: the h5ad file it becomes, what it holds, and its originals."""

    name: str
    file: str
    description: str
    license: str
    citation: str
    originals: tuple[Original, ...]

    @property
    def download_size(self) -> int:
        return sum(original.size for original in self.originals)


def _repo(owner_repo: str, commit: str, folder: str) -> str:
    return f"{_GITHUB}/{owner_repo}/{commit}/{folder}"


_RDEEPMAPS = _repo("chthub/rDeepmaps", "2d0baac86ccb806a52834062287fd1d6cfbc09cd", "data")
_CHAI = _repo("lodimk2/chai", "4e6adb8f8be0534c831e3ed4aa343cf964cec222", "data")
_MIXOLOGY = _repo("LuyiTian/sc_mixology", "7d00ffb0bd043467f365a9358d7312f294f13c9f", "data/csv")
_CELLTYPIST = _repo("Teichlab/celltypist", "fe357564a6625d3b1732a022fd39f18e55696e80", "celltypist/data/samples")
_CLUSTIFYR = _repo("rnabioco/clustifyr", "0097813c1c36f4a8a84b0f4cc3a4449c46d070e8", "data")
_CELLASSIGN_PAPER = _repo(
    "Irrationone/cellassign-paper", "61e4d43e5ea6f04e618de84f706051d7485f8a17", "resources/marker_lists"
)


def _original(base: str, name: str, sha256: str, size: int) -> Original:
    return Original(name, f"{base}/{name}", sha256, size)


DATASETS: dict[str, DataSet] = {
    dataset.name: dataset
    for dataset in [
        DataSet(
            "ifnb_2800",
            "ifnb_2800_counts.h5ad",
            "IFN-beta stimulated and control PBMCs, every 5th cell; obs: condition (CTRL / STIM), "
            "cell_type (13 Seurat-annotated types)",
            "MIT (chthub/rDeepmaps)",
            "Kang et al. 2018, Nat Biotechnol (GEO GSE96583)",
            (_original(_RDEEPMAPS, "ifnb_2800.rda",
                       "e81d90bac3f120583b171655412c3866bb6ac9ca73c219e7ffa584be9b709c6f", 2228941),),
        ),
        DataSet(
            "cellbench_3cl",
            "cellbench_3cl_celseq2_dropseq_counts.h5ad",
            "3 lung adenocarcinoma cell lines by CEL-seq2 and Drop-seq; obs: batch, cell_line_demuxlet "
            "(truth by genotype), demuxlet_cls (DBL = doublet); var_names Ensembl IDs, var: gene_symbol",
            "MIT (LuyiTian/sc_mixology; gene symbols from Teichlab/celltypist)",
            "Tian et al. 2019, Nat Methods (CellBench)",
            (
                _original(_MIXOLOGY, "sc_celseq2.count.csv.gz",
                          "a82aa89b8995aed412f4260c0adb343967e33a801af6f2e0aa647c1d897a5a21", 2089195),
                _original(_MIXOLOGY, "sc_celseq2.metadata.csv.gz",
                          "78429916bac394d92d8c972059a8f195c5479ce578da04f1eb3ba599585ef3d9", 15903),
                _original(_MIXOLOGY, "sc_dropseq.count.csv.gz",
                          "98c0bb6a9fbf4b93967ef82cef9985d7691cf59a31dc5b0b3699f70ed1a0fd08", 1299691),
                _original(_MIXOLOGY, "sc_dropseq.metadata.csv.gz",
                          "4c48f3e13778e89192d9861095bc102cc0deb9eba1a7f47a093f5a058ce1aa6a", 10611),
                _original(_CELLTYPIST, "GENCODEv44_Gene_id2name.csv",
                          "0a8d9b07cf63f9ef70e65f3c7afc9d2092a7d9890281172df770003827912f53", 1658156),
            ),
        ),
        DataSet(
            "baron_mouse1",
            "baron_mouse1_counts.h5ad",
            "mouse pancreas, mouse 1 (inDrop); obs: cell_type (13 author-annotated types), batch",
            "MIT (lodimk2/chai)",
            "Baron et al. 2016, Cell Syst (GEO GSM2230761)",
            (
                _original(_CHAI, "baron_mouse_1.rda",
                          "479a80e704446d9a765a4b1832dee173cf1543b21c005f3dc7b65e4f8a790965", 1173402),
                _original(_CHAI, "baron_mouse_1_ground_truth.rda",
                          "5665f1a96e88f63ad997db67cec8e3f9d97659c0fa077de81184b53b4930b4e4", 1595),
            ),
        ),
        DataSet(
            "pbmc3k_hvg2000",
            "pbmc3k_hvg2000_counts.h5ad",
            "10x PBMC 3k, the Seurat tutorial's 2,000 variable genes only; obs: cell_type (9 types), "
            "nCount_RNA (library size over all genes), nFeature_RNA, percent.mt, seurat_clusters",
            "MIT (rnabioco/clustifyr)",
            "10x Genomics pbmc3k; Seurat pbmc3k tutorial annotation",
            (
                _original(_CLUSTIFYR, "pbmc_matrix_small.rda",
                          "39341670402211fe906327dc16db04cdacb8eda89fae11a9448e532d6c80eea4", 787428),
                _original(_CLUSTIFYR, "pbmc_meta.rda",
                          "df238012d0de5b5ad60009cbce75ad8390899d2decf6944ecf2dfc8bca283e5b", 55536),
            ),
        ),
    ]
}

MARKER_GROUP = "cellassign_paper_marker_lists"
"""The folder of the marker lists, in a data directory's ``markers/``, in the cache and on a mirror."""

MARKER_LICENSE = "no license file (Irrationone/cellassign-paper); fetched, not redistributed"

# marker list name -> its YAML file (type: [genes]) in the CellAssign paper's repository.
_MARKER_FILES = {
    "example_TME_marker_list": ("24a0f210b1774813300a56e3302160b4570f7d8bec9fcd4ec50553a7629b4656", 706),
    "follicular_big": ("95bce62dd4d78fe22668c7eedcd8e43a780fbf801b3c1529b6e746ae902e3dc1", 695),
    "follicular_big_merged": ("3e5c9b2ea4f5fc3536fcfb6b623571050d531ba9304ed7cc2f47814e9b51a562", 380),
    "follicular_hgsc_combined": ("0a778e24b7704302db755d2cf42cf88c8a752bde19faf5e25ef787d01898ca2e", 1168),
    "follicular_lambda_kappa": ("5c2040d2f5c5427e51a0ae8ac3805c984a1f9df8506b2ccfb1ca719895b26e5d", 61),
    "follicular_merged_lk": ("3773b6fe3d2a28c7306d778e1bdeb9285d52f536d40f30e4cc4ec69eccb0fefe", 493),
    "follicular_small": ("ba30fb3a4e150ac62bd3ea248ac79700ed0409da9b0be730ebf0720c89c3e00e", 139),
    "hgsc_big": ("91774ba7ba803a7c65c32bcf02d8176cc35f0fad32524ef349c5fa1c064f6f80", 787),
    "hgsc_small": ("3d9255c46f28decc6984aed63ca7eb1e2b987932c9f98c5177cf44402120702f", 704),
    "koh_markers": ("baec54252e23fdf1f1b04020e49553a2e436e6c2a0018641f8f80520366efd25", 8000),
    "koh_markers_APS_MPS": ("9de20aeef75db9770c2a1a25c7d8453f6438f487233f5163ec74b8038ba6fa74", 52),
    "koh_markers_merged": ("e7a7160d2dd1fa127310e6225166a749176c4af163e7ff33683c43db6378fc45", 6757),
    "liver_mcparland_3types": ("2405c8a31685920371115bfb2b640b812eed74a9168af9854504e849182c6d2e", 247),
    "liver_mcparland_3types_revised": ("b5b0a49606bd39707059382f46edf7a60597237b5ec5de9bc5982757fe61bdf2", 239),
    "liver_mcparland_4types": ("d6e8cc17c6d16a8982569153d4b42b0455862e7c492c9321f65864c5dae9849d", 294),
    "liver_mcparland_alltypes": ("4969bb1530c391da08aa6c2c75c67cbf92ae3dbf69eb75ae228268e384f22b13", 670),
    "liver_mcparland_alltypes_revised2": ("32a4710e2d5406ea0f3158433999ed128cd8889ff8aabf1926b2abd02d5e58a8", 1095),
    "liver_panglaodb_human_canonical_revised": (
        "1bca425ae8e401e4f1e2a47f58126b2979fe90486b4c55c2ea7db322f821b125", 883),
    "tian_20_73_markers": ("2f66c9afd2854dda11c2fa295360733d1e5cd11542fdd5e2109bf37158b984df", 275),
    "tian_30_73_markers": ("a0a23f5db2abe196e8592fcf586dd6ecbfb8db314686b8e40dbc896d9ce05e54", 413),
    "tian_50_73_markers": ("afa8c80e65c20777ee336a78948df2983528362a54ba474b6a8cb29c2800c4ea", 717),
    "tian_73_73_markers": ("b04041034ecb095d0ebef33dba4a18a7971330d0a8b8b5bb11649b86e32f84ec", 1004),
}

MARKERS: dict[str, Original] = {
    # the Tian et al. lists are named without the file's "_markers" suffix: load_markers("tian_73_73")
    stem.removesuffix("_markers") if stem.startswith("tian_") else stem:
        _original(_CELLASSIGN_PAPER, f"{stem}.yaml", sha256, size)
    for stem, (sha256, size) in _MARKER_FILES.items()
}
